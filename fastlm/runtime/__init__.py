"""fastlm.runtime: the generation runtime over fastlm.model.

    sampling.py    SamplingParams (validated), logits processing, on-device sampling
    text.py        incremental detokenization, stop strings
    generate.py    prefill -> decode steps -> stop: TokenLoop (ragged batches, host-read policy)
    cuda_graph.py  the decode step captured in a CUDA graph (GPU)
    cpu_linear.py  oneDNN-prepacked linear layers (CPU)
    llm.py         the Python API, fastlm.LLM
    commands.py    `fastlm generate` and `fastlm bench`
    bench.py       speed measurement shared by `fastlm bench` and benchmarks/bench_generate.py

Nothing is imported here, so `import fastlm.runtime.sampling` stays light.
"""
