import json

import pytest
from PIL import Image

from ternvlm.data.registry import load_eval_set
from ternvlm.errors import TernvlmError


def make_folder(root, rows, images=("a.png", "b.jpg")):
    root.mkdir()
    for name in images:
        Image.new("RGB", (40, 30), "red").save(root / name)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_reads_captions_and_qa(tmp_path):
    root = make_folder(
        tmp_path / "d",
        [
            {"file_name": "a.png", "text": "a red square"},
            {"file_name": "b.jpg", "text": "red", "question": "what colour?", "answer": "red"},
        ],
    )
    ds = load_eval_set(f"imagefolder:{root}")
    assert len(ds.images) == 2
    assert [it.kind for it in ds.items] == ["caption", "caption", "qa"]
    assert ds.items[2].prompt == "question: what colour? answer:"


@pytest.mark.parametrize(
    "rows,msg",
    [
        ([{"text": "no file"}], "file_name"),
        ([{"file_name": "a.png"}], "needs text"),
        ([{"file_name": "missing.png", "text": "x"}], "image not found"),
        ([], "no rows"),
    ],
)
def test_bad_folders(tmp_path, rows, msg):
    root = make_folder(tmp_path / "d", rows)
    with pytest.raises(TernvlmError, match=msg):
        load_eval_set(f"imagefolder:{root}")


def test_missing_metadata(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(TernvlmError, match="metadata.jsonl"):
        load_eval_set(f"imagefolder:{tmp_path / 'd'}")
    with pytest.raises(TernvlmError, match="not found"):
        load_eval_set(f"imagefolder:{tmp_path / 'nope'}")
