"""fastlm.runtime.bench's side-by-side timing: runs warmed up, then taking turns; medians per run."""
from fastlm.runtime import bench


def test_alternate_speeds_warms_up_then_takes_turns_and_takes_medians():
    calls = []

    def timed(name, times):
        times = iter(times)

        def run():
            calls.append(name)
            return next(times)
        return run

    runs = {"a": timed("a", [(9.0, 9.0), (1.0, 4.0), (3.0, 2.0), (2.0, 8.0)]),
            "b": timed("b", [(9.0, 9.0), (4.0, 1.0), (4.0, 1.0), (4.0, 1.0)])}
    speeds = bench.alternate_speeds(runs, batch_size=2, prompt_len=10, new_tokens=8, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # the warmups (9 s) are not counted
    assert speeds["a"] == {"prefill_tok_s": 2 * 10 / 2.0, "decode_tok_s": 2 * 8 / 4.0}
    assert speeds["b"] == {"prefill_tok_s": 2 * 10 / 4.0, "decode_tok_s": 2 * 8 / 1.0}


def test_engine_and_hf_runs_time_the_same_generation(checkpoints, llms, reference_kernels):
    import torch
    import transformers as tf

    folder = checkpoints["gpt2"][0]
    model = llms["gpt2"].model
    hf_model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine = bench.fastlm_engine(model, 2, 5, 3)
    runs = {"fastlm": bench.engine_run(engine, 2, 5, 3), "hf": bench.hf_run(hf_model, 2, 5, 3)}
    speeds = bench.alternate_speeds(runs, 2, 5, 3, repeats=2)
    assert set(speeds) == {"fastlm", "hf"}
    assert all(v > 0 for s in speeds.values() for v in s.values())
    assert not engine.has_unfinished()  # each run finishes its requests
