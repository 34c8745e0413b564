"""fastlm.runtime: the generation runtime over fastlm.model.

    sampling.py    SamplingParams (validated), logits processing, on-device sampling
    text.py        incremental detokenization, stop strings
    prompts.py     prompt validation
    engine/        the engine: paged KV pool, scheduler (continuous batching, chunked prefill,
                   preemption), prefix cache, per-request sampling, the background step loop
    parallel/      tensor-parallel inference: the ranks (spawned or torchrun's), rank 0's engine sending
                   each step to the others, heartbeats and failures
    cuda_graph.py  pure-decode engine steps replayed from CUDA graphs per batch bucket (GPU)
    cpu_linear.py  oneDNN-prepacked linear layers (CPU)
    results.py     Completion (return_details=True) and the shapes of results
    llm.py         the Python API, fastlm.LLM, on the engine
    commands.py    `fastlm generate` and `fastlm bench`
    bench.py       speed measurement shared by `fastlm bench` and benchmarks/bench_generate.py

Nothing is imported here, so `import fastlm.runtime.sampling` stays light.
"""
