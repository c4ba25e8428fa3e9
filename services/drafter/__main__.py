import sys

from blockpilot.serving.server import main
from services.drafter.server import serve

sys.exit(main(serve))
