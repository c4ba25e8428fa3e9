import sys

from blockpilot.serving.server import main
from services.policy.server import serve

sys.exit(main(serve))
