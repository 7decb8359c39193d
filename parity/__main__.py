import sys

try:
    from .cli import main
except ModuleNotFoundError as e:  # an interpreter without the suite's dependencies (a venv not activated)
    print(f"python -m parity: {e.msg}; run it with the interpreter that installed the suite "
          "(README: .venv/bin/python -m parity ...)", file=sys.stderr)
    sys.exit(2)
except KeyboardInterrupt:  # Ctrl-C while torch and the suite load: nothing ran
    print("interrupted: no verdict", file=sys.stderr)
    sys.exit(128 + 2)

sys.exit(main())
