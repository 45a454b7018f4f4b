"""CLI placeholder entry; the orchestrator module fills the subcommands."""
from pipeline.cli import main

if __name__ == "__main__":
    main()
