"""`python -m services.executor`: runs the executor until SIGTERM."""

from services.common.bootstrap import main
from services.executor.app import build
from services.executor.settings import ExecutorSettings

if __name__ == "__main__":
    main("executor", ExecutorSettings, build)
