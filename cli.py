"""Run paged-rewrite from a checkout without installing: ``python cli.py model.onnx -o paged.onnx``."""

from paged_rewrite._entry import main

if __name__ == "__main__":
    main()
