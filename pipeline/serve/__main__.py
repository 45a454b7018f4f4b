"""``python -m pipeline.serve``: the same server as ``python -m pipeline serve``."""

import argparse

import pipeline.serve as serve

if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=serve.__doc__.split("\n\n")[0])
    serve.add_arguments(_parser)
    raise SystemExit(serve.main(_parser.parse_args()))
