"""`python -m job` and the `stem-job` script: the allocator is chosen first (job/malloc.py
re-executes the process), before the CLI and its imports are loaded twice for nothing."""

from job.malloc import use_tcmalloc


def main():
    use_tcmalloc()
    from job.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
