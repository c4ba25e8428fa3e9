import sys

from blockpilot.serving.server import main
from services.verifier.server import serve

sys.exit(main(serve))
