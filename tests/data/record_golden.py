"""How tests/data/golden_generation.json was recorded (run at the repository root of commit bdcfea8: `python tests/data/record_golden.py /tmp/golden > tests/data/golden_generation.json`, then wrapped with `recorded_by`). Builds the same two files as tests/test_golden.py."""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, "tests")
from oracles.tiny import attach_clips, make_model, save_bin_checkpoint, LAYER_CLIP_NAMES, EOS_ID
try:
    from lsgpt.export.convert import export_model
    from lsgpt.engine import Engine, SamplingParams
    from lsgpt.engine.scheduler import Scheduler
except ImportError:
    from lsgpt.convert import export_model
    from lsgpt.engine import Engine, SamplingParams
    from lsgpt.scheduler import Scheduler

torch.set_num_threads(1)
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
m = make_model(seed=3, wide=True)
fp = export_model(m, out / "fp.hdf5", max_step=64, eos_id=EOS_ID)
clips = [{n: 2.0 + 0.5 * i + 0.25 * k for k, n in enumerate(LAYER_CLIP_NAMES)} for i in range(2)]
attach_clips(m, clips, emb_clip=0.9, output_ln_clip=6.0)
i8 = export_model(save_bin_checkpoint(m, out / "ck"), out / "int8.hdf5", max_step=64, eos_id=EOS_ID, quantize=True)
PROMPTS = [[EOS_ID, 5, 17, 300], [EOS_ID, 42], [EOS_ID, 7, 7, 7, 7, 7, 900, 12]]
CASES = {
    "greedy": dict(max_new_tokens=24, top_k=1, ignore_eos=True),
    "penalized_greedy": dict(max_new_tokens=24, top_k=1, repetition_penalty=1.3, frequency_penalty=0.5,
                             presence_penalty=0.2, ignore_eos=True),
    "sampled": dict(max_new_tokens=24, top_k=8, top_p=0.9, temperature=0.8, seed=1234, ignore_eos=True),
    "sampled_penalized": dict(max_new_tokens=24, top_k=0, top_p=0.95, temperature=1.1, seed=7,
                              repetition_penalty=1.2, frequency_penalty=0.3, ignore_eos=True),
}
res = {}
for kind, path in (("fp", fp), ("int8", i8)):
    eng = Engine.load(str(path), device="cpu")
    for case, kw in CASES.items():
        p = SamplingParams(**kw)
        rows = eng.generate(PROMPTS, p)
        res[f"{kind}/{case}/engine"] = [list(map(int, r)) for r in rows]
    s = Scheduler(eng, max_rows=4)
    try:
        for case, kw in CASES.items():
            res[f"{kind}/{case}/scheduler"] = [list(map(int, s.generate(pr, SamplingParams(**kw)))) for pr in PROMPTS]
    finally:
        s.close()
print(json.dumps(res))
