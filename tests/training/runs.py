"""Options shared by the training tests: the "tiny" preset on the synthetic corpus, a few steps."""

TINY_RUN = dict(config="tiny", block_size=32, batch_size=8, lr=3e-3, warmup=5, progress=False, seed=0)
