"""`python -m services.gateway`: serve the OpenAI-compatible HTTP API until SIGTERM."""

from services.gateway.app import main

if __name__ == "__main__":
    main()
