"""The export stage streams weights file by file: what it writes must be the student, cast."""

import torch

from factory.checkpoint.export import stream_weights
from factory.models.hqwen3.student import drop_teacher_attention, student_key
from tests.helpers import tiny_hybrid


def test_streamed_export_is_the_student_in_the_export_dtype(tmp_path):
    from functools import partial

    from safetensors.torch import load_file

    hybrid = tiny_hybrid(keep_teacher_attention=True)
    hybrid.save_pretrained(tmp_path / "src", max_shard_size="40KB")  # several shards and an index
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    count = stream_weights(tmp_path / "src", tmp_path / "out", torch.bfloat16, partial(student_key, hybrid.config))
    got = {}
    for path in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(path))
    want = drop_teacher_attention(hybrid.config, hybrid.state_dict()).state_dict()
    assert count == len(got) and got.keys() == want.keys()
    assert any(".self_attn." in k for k in hybrid.state_dict()) and len(want) < len(hybrid.state_dict())
    for key, value in want.items():
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], value.to(torch.bfloat16)), key
