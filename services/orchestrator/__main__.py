"""`python -m services.orchestrator`: runs the public API until SIGTERM."""

from services.common.bootstrap import main
from services.orchestrator.app import build
from services.orchestrator.settings import OrchestratorSettings

if __name__ == "__main__":
    main("orchestrator", OrchestratorSettings, build)
