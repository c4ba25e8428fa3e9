import sys

from blockpilot.serving.server import main
from services.gateway.server import serve

sys.exit(main(serve))
