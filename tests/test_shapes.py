import numpy as np
import pytest

from ternvlm.data import shapes


def test_same_index_same_scene_and_pixels():
    a, b = shapes.make_sample("test", 7), shapes.make_sample("test", 7)
    assert a.scene == b.scene
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.captions == b.captions and a.qas == b.qas


def test_indices_and_splits_differ():
    keys = {shapes.scene_for("val", i).key() for i in range(50)}
    assert len(keys) > 45
    assert shapes.scene_for("val", 3) != shapes.scene_for("test", 3)


def test_splits_are_disjoint():
    val = {shapes.scene_for("val", i).key() for i in range(shapes.SPLIT_SIZES["val"])}
    test = {shapes.scene_for("test", i).key() for i in range(shapes.SPLIT_SIZES["test"])}
    train = {shapes.scene_for("train", i).key() for i in range(3000)}
    assert not (val & test)
    assert not (train & (val | test))


def test_held_out_pairs_only_in_test():
    for split, n in (("train", 2000), ("val", 256)):
        for i in range(n):
            for o in shapes.scene_for(split, i).objects:
                assert (o.colour, o.shape) not in shapes.HELD_OUT
    novel = [shapes.scene_for("test", i) for i in range(512)]
    novel = [s for s in novel if s.novel]
    assert len(novel) > 100
    assert all(any((o.colour, o.shape) in shapes.HELD_OUT for o in s.objects) for s in novel)


def test_scene_invariants_and_answers():
    for i in range(300):
        s = shapes.make_sample("train", i)
        objs = s.scene.objects
        assert 1 <= len(objs) <= 4
        assert len({o.position for o in objs}) == len(objs)
        assert s.image.size == (64, 64) and s.image.mode == "RGB"
        qa = {q.question: q.answer for q in s.qas}
        assert qa["how many shapes are there?"] == shapes.NUMBERS[len(objs)]
        for o in objs:
            assert qa[f"what shape is at the {o.position}?"] == o.shape
            assert qa[f"what size is the shape at the {o.position}?"] == o.size
            if o.text:
                assert qa[f"what is written at the {o.position}?"] == o.text
        assert len(set(s.captions)) == len(s.captions)


def test_object_is_drawn_where_the_scene_says():
    s = shapes.make_sample("val", 11)
    img = np.asarray(s.image).astype(int)
    bg = np.array(shapes.BACKGROUNDS[s.scene.background])
    for o in s.scene.objects:
        i = shapes.POSITIONS.index(o.position)
        quad = img[(i // 2) * 32 : (i // 2 + 1) * 32, (i % 2) * 32 : (i % 2 + 1) * 32]
        near = np.abs(quad - np.array(shapes.COLOURS[o.colour])).sum(-1) < 60
        assert near.sum() > 10, o
    empty = set(range(4)) - {shapes.POSITIONS.index(o.position) for o in s.scene.objects}
    for i in empty:
        quad = img[(i // 2) * 32 : (i // 2 + 1) * 32, (i % 2) * 32 : (i % 2 + 1) * 32]
        assert (np.abs(quad - bg).sum(-1) < 10).all()


def test_bad_split_and_range():
    with pytest.raises(ValueError):
        shapes.scene_for("nope", 0)
    with pytest.raises(IndexError):
        shapes.scene_for("test", shapes.SPLIT_SIZES["test"])
    with pytest.raises(ValueError):
        list(shapes.iter_split("train"))
