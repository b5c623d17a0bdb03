"""`python -m services.control`: runs the control service until SIGTERM."""

from services.common.bootstrap import main
from services.control.app import build
from services.control.settings import ControlSettings

if __name__ == "__main__":
    main("control", ControlSettings, build)
