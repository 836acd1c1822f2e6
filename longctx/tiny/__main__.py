"""``python -m longctx.tiny``: the ``train-tiny`` command line (:func:`longctx.tiny.cli.train_tiny_main`)."""
from longctx.tiny.cli import train_tiny_main

if __name__ == "__main__":
    raise SystemExit(train_tiny_main())
