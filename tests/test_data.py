"""memkit.data: the revisit and scenes worlds, WorldDataset, LatentDataset."""

import itertools
import pickle
import socket
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from memkit import MemkitError
from memkit.data import (
    PHOTOS,
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    LatentDataset,
    RevisitWorld,
    SceneWorld,
    WorldDataset,
    camera_actions,
    find_revisits,
    load_photo,
    make_canvas,
    pan_path,
    photo_canvas,
    random_prompt,
    render,
    revisit_clip,
    scene_clip,
    scene_sequence,
)
from memkit.data import canvas as canvas_module
from memkit.errors import DataError

seeds = st.integers(0, 2**31 - 1)
small = settings(max_examples=20, deadline=None)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    """Elementwise |a - b| <= atol (torch.testing.assert_close costs seconds on its first call)."""
    return a.shape == b.shape and bool((a - b).abs().max() <= atol)


# --------------------------------------------------------------------------- canvases and rendering


@small
@given(seed=seeds, height=st.integers(4, 40), width=st.integers(4, 120))
def test_canvas_is_deterministic_in_range(seed: int, height: int, width: int) -> None:
    canvas = make_canvas(seed, height, width)
    assert canvas.shape == (height, width, 3) and canvas.dtype == np.float32
    assert canvas.min() >= 0 and canvas.max() <= 1
    np.testing.assert_array_equal(canvas, make_canvas(seed, height, width))
    assert not np.array_equal(canvas, make_canvas(seed + 1, height, width))


def test_canvas_windows_are_distinguishable() -> None:
    """No two frame windows at different places look alike: the world has detail everywhere."""
    canvas = make_canvas(3, 16, 160)
    frames = render(canvas, [(0, x) for x in range(0, 145, 4)], 16)
    dist = (frames[:, None] - frames[None]).abs().mean(dim=(2, 3, 4))
    off_diag = dist[~torch.eye(len(frames), dtype=torch.bool)]
    assert off_diag.min() > 0.05, off_diag.min()


@small
@given(seed=seeds, data=st.data())
def test_render_integer_positions_are_exact_crops(seed: int, data: st.DataObject) -> None:
    canvas = make_canvas(seed, 12, 40)
    fh, fw = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 40))
    path = data.draw(st.lists(st.tuples(st.integers(0, 12 - fh), st.integers(0, 40 - fw)), min_size=1, max_size=6))
    video = render(canvas, path, (fh, fw))
    assert video.shape == (len(path), 3, fh, fw) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    for frame, (y, x) in zip(video, path, strict=True):
        want = torch.from_numpy(canvas[y : y + fh, x : x + fw]).permute(2, 0, 1) * 2 - 1
        assert _close(frame, want, 1e-6)


def test_render_fractional_position_interpolates() -> None:
    canvas = make_canvas(0, 8, 20)
    a, b, half = render(canvas, [(0, 3), (0, 4), (0, 3.5)], 8)
    assert _close(half, (a + b) / 2, 1e-5)


def test_render_accepts_uint8_and_tensor_canvases() -> None:
    canvas = (make_canvas(1, 8, 24) * 255).round().astype(np.uint8)
    from_uint8 = render(canvas, [(0, 5)], 8)
    from_float = render(torch.from_numpy(canvas.astype(np.float32) / 255), [(0, 5)], 8)
    assert _close(from_uint8, from_float, 1e-6)


@pytest.mark.parametrize(
    "canvas, path, frame, message",
    [
        (np.zeros((8, 20)), [(0, 0)], 8, "canvas must be an RGB image (H, W, 3), got shape (8, 20)"),
        (np.full((8, 20, 3), 1.5), [(0, 0)], 8, "a float canvas must lie in [0, 1], got values in [1.5, 1.5]"),
        (np.zeros((8, 20, 3), dtype=np.int64), [(0, 0)], 8, "canvas must be float in [0, 1] or uint8"),
        (np.full((8, 20, 3), np.nan), [(0, 0)], 8, "canvas has non-finite values"),
        (np.zeros((8, 20, 3)), [(0, 0), (0, 13)], 8, "frame 1 at x=13 leaves the canvas"),
        (np.zeros((8, 20, 3)), [(0, 0)], 9, "a frame 9 pixels along y fits at y in [0, -1]"),
        (np.zeros((8, 20, 3)), [(0, 0, 0)], 8, "path must be a sequence of (y, x) positions"),
    ],
)
def test_render_refuses_bad_input(canvas: np.ndarray, path: list, frame: int, message: str) -> None:
    with pytest.raises(DataError) as err:
        render(canvas, path, frame)
    assert message in str(err.value)
    assert isinstance(err.value, MemkitError) and isinstance(err.value, ValueError)


@small
@given(width=st.integers(10, 200), frame=st.integers(1, 10), frames=st.integers(1, 40))
def test_pan_path_goes_out_and_exactly_back_inside_the_canvas(width: int, frame: int, frames: int) -> None:
    path = pan_path(width, frame, frames)
    assert path.shape == (frames, 2)
    np.testing.assert_array_equal(path, path[::-1])
    assert path[:, 1].min() >= 0 and path[:, 1].max() <= width - frame
    render(np.zeros((frame, width, 3)), path, frame)  # fits


def test_pan_path_refuses_a_speed_that_leaves_the_canvas() -> None:
    with pytest.raises(DataError, match=r"speed 5 pixels per frame for 3 steps moves 15 pixels, but the canvas leaves"):
        pan_path(20, 8, 7, speed=5)
    with pytest.raises(DataError, match="does not fit a canvas 6 wide"):
        pan_path(6, 8, 7)


# --------------------------------------------------------------------------- revisit world


@small
@given(
    seed=seeds,
    frames=st.integers(1, 6),
    segments=st.integers(1, 5),
    fh=st.integers(4, 12),
    fw=st.integers(4, 12),
    speed=st.sampled_from([None, 0.5, 1, 3]),
)
def test_revisit_clip_pairs_match_and_actions_follow_positions(
    seed: int, frames: int, segments: int, fh: int, fw: int, speed: float | None
) -> None:
    clip = revisit_clip(seed, frames, segments, (fh, fw), speed=speed)
    t = frames * segments
    assert clip.video.shape == (t, 3, fh, fw) and clip.video.dtype == torch.float32
    assert clip.video.min() >= -1 and clip.video.max() <= 1
    assert clip.actions.shape == (t, 2) and clip.positions.shape == (t, 2) and clip.segments == segments
    # deterministic
    again = revisit_clip(seed, frames, segments, (fh, fw), speed=speed)
    assert torch.equal(clip.video, again.video) and torch.equal(clip.revisit_pairs, again.revisit_pairs)
    # every frame of the return sweep is paired with the outbound frame at the same place, and matches it
    later, earlier = clip.revisit_pairs.T
    returning = [i for i in range(t) if t - 1 - i < i]  # with an even t, the rest at the far end counts
    assert later.tolist() == returning and earlier.tolist() == [t - 1 - i for i in returning]
    assert torch.equal(clip.video[later], clip.video[earlier])
    assert torch.equal(clip.positions[later], clip.positions[earlier])
    # actions integrate to positions
    steps = torch.cumsum(clip.actions, 0) * torch.tensor([fh, fw], dtype=torch.float32)
    assert _close(clip.positions[0] + steps, clip.positions, 1e-3)
    assert clip.actions[0].abs().sum() == 0
    if speed is None and (t - 1) // 2 >= 2:
        assert clip.canvas.shape[2] >= 3 * fw  # the world is much wider than the frame


def test_revisit_clip_frames_of_different_places_differ() -> None:
    clip = revisit_clip(5, 4, 4, 16)
    out = clip.video[:8]
    dist = (out[:, None] - out[None]).abs().mean(dim=(2, 3, 4))
    assert dist[~torch.eye(8, dtype=torch.bool)].min() > 0.02
    assert not torch.equal(clip.video, revisit_clip(6, 4, 4, 16).video)


@small
@given(seed=seeds, path=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12))
def test_find_revisits_on_any_path_pairs_identical_frames(seed: int, path: list[tuple[int, int]]) -> None:
    video = render(make_canvas(seed, 8, 8), path, 5)
    pairs = find_revisits(path)
    for later, earlier in pairs.tolist():
        assert earlier < later and path[earlier] == path[later]
        assert path.index(path[later]) == earlier  # the first visit
        assert torch.equal(video[later], video[earlier])
    assert len(pairs) == len(path) - len(set(path))


def test_camera_actions_are_moves_over_frame_size() -> None:
    assert camera_actions(np.array([(0, 0), (3, 8), (3, 4)]), (6, 16)).tolist() == [
        [0.0, 0.0],
        [0.5, 0.5],
        [0.0, -0.25],
    ]


def test_revisit_world_sample_and_errors() -> None:
    world = RevisitWorld(frames_per_segment=2, segments=3, frame_size=8, sources=("procedural", "coffee"))
    sample = world.sample(4)
    assert sample["video"].shape == (3, 2, 3, 8, 8) and sample["actions"].shape == (3, 2, 2)
    assert sample["prompt"].shape == (3, 8, 16) and sample["prompt_mask"].dtype == torch.bool
    assert torch.equal(sample["prompt"][0], sample["prompt"][2])
    with pytest.raises(DataError, match="unknown source 'lena'"):
        RevisitWorld(sources=("lena",))
    with pytest.raises(DataError, match="source must be 'procedural' or one of astronaut"):
        revisit_clip(0, source="lena")
    with pytest.raises(DataError, match="seed must be an int >= 0, got -1"):
        revisit_clip(-1)


# --------------------------------------------------------------------------- photos


def test_photos_load_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    canvas_module._load_photo_cached.cache_clear()
    for name in PHOTOS:
        photo = load_photo(name)
        assert photo.ndim == 3 and photo.shape[2] == 3 and min(photo.shape[:2]) >= 150, name
        assert photo.dtype == np.float32 and photo.min() >= 0 and photo.max() <= 1 and photo.std() > 0.02, name
        canvas = photo_canvas(name, height=16)
        assert canvas.shape == (16, 64, 3) and canvas.min() >= 0 and canvas.max() <= 1


def test_photo_split_is_a_partition() -> None:
    assert set(TRAIN_PHOTOS).isdisjoint(TEST_PHOTOS)
    assert set(TRAIN_PHOTOS) | set(TEST_PHOTOS) == set(PHOTOS)
    assert len(TEST_PHOTOS) >= 3 and len(TRAIN_PHOTOS) >= 8


def test_photo_canvas_offsets_and_revisit_clip_from_a_photo() -> None:
    assert not np.array_equal(photo_canvas("rocket", 16, 40, offset=0.0), photo_canvas("rocket", 16, 40, offset=1.0))
    clip = revisit_clip(2, 4, 2, 16, source="astronaut")
    later, earlier = clip.revisit_pairs.T
    assert torch.equal(clip.video[later], clip.video[earlier])
    assert torch.equal(clip.video, revisit_clip(2, 4, 2, 16, source="astronaut").video)
    assert not torch.equal(clip.video, revisit_clip(3, 4, 2, 16, source="astronaut").video)
    with pytest.raises(DataError, match="unknown photo 'lena'"):
        load_photo("lena")


def test_photos_without_scikit_image_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    canvas_module._load_photo_cached.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(DataError, match=r"need scikit-image.*pip install 'memkit-video\[video\]'"):
        load_photo("coffee")
    monkeypatch.undo()
    canvas_module._load_photo_cached.cache_clear()


# --------------------------------------------------------------------------- scenes world


@small
@given(seed=seeds, frames=st.integers(1, 4), segments=st.integers(1, 6), scenes=st.integers(2, 4))
def test_scene_clip_returning_brings_the_scene_back(seed: int, frames: int, segments: int, scenes: int) -> None:
    clip = scene_clip(seed, frames, segments, 12, num_scenes=scenes, prompt_tokens=5, prompt_dim=6)
    assert clip.video.shape == (frames * segments, 3, 12, 12) and clip.actions.shape == (frames * segments, 2)
    assert clip.prompts.shape == (segments, 5, 6) and clip.prompt_mask.shape == (segments, 5)
    assert clip.video.min() >= -1 and clip.video.max() <= 1
    ids = clip.scene_ids.tolist()
    assert ids == scene_sequence(seed, segments, scenes)
    video = clip.video.reshape(segments, frames, 3, 12, 12)
    for i in range(segments):
        for j in range(segments):
            same = ids[i] == ids[j]
            assert torch.equal(video[i], video[j]) == same
            assert torch.equal(clip.prompts[i], clip.prompts[j]) == same
            if not same:
                assert (video[i] - video[j]).abs().mean() > 0.05
    again = scene_clip(seed, frames, segments, 12, num_scenes=scenes, prompt_tokens=5, prompt_dim=6)
    assert torch.equal(clip.video, again.video) and torch.equal(clip.prompts, again.prompts)


@small
@given(seed=seeds, segments=st.integers(1, 12), scenes=st.integers(2, 5))
def test_scene_sequence_switches_and_revisits(seed: int, segments: int, scenes: int) -> None:
    ids = scene_sequence(seed, segments, scenes)
    assert len(ids) == segments and all(0 <= i < scenes for i in ids)
    assert all(a != b for a, b in itertools.pairwise(ids))
    if segments > scenes:
        assert len(set(ids)) < segments  # some scene comes back (pigeonhole: a random run found [2, 0, 1])
    assert ids == scene_sequence(seed, segments, scenes)


def test_scene_prompts_are_padded_and_distinct() -> None:
    clip = scene_clip(1, 2, 4, 8, scene_ids=[0, 1, 2, 0], prompt_tokens=8, prompt_dim=16)
    mask = clip.prompt_mask
    assert mask.dtype == torch.bool and mask[:, 0].all() and (~mask).any(dim=1).all()  # real first, then padding
    assert (clip.prompts[~mask] == 0).all()
    assert not torch.equal(clip.prompts[0], clip.prompts[1]) and not torch.equal(clip.prompts[1], clip.prompts[2])
    assert torch.equal(clip.prompts[0], clip.prompts[3])
    # prompts differ in direction, not just in padding
    real = clip.prompts[:3, 0]
    cos = torch.nn.functional.cosine_similarity(real[:, None], real[None], dim=-1)
    assert cos[~torch.eye(3, dtype=torch.bool)].abs().max() < 0.9


def test_scene_world_seed_fixes_the_bank() -> None:
    a = scene_clip(1, 2, 2, 8, scene_ids=[0, 1], world_seed=7)
    b = scene_clip(2, 2, 2, 8, scene_ids=[1, 0], world_seed=7)
    assert torch.equal(a.video[:2], b.video[2:]) and torch.equal(a.prompts[0], b.prompts[1])
    c = scene_clip(2, 2, 2, 8, scene_ids=[1, 0])
    assert not torch.equal(a.video[:2], c.video[2:])
    with pytest.raises(DataError, match=r"scene_ids must hold 2 ints \(one per segment\) in \[0, 3\), got \[0, 3\]"):
        scene_clip(0, 2, 2, 8, scene_ids=[0, 3])


def test_random_prompt() -> None:
    prompt, mask = random_prompt(3, tokens=1, dim=4)
    assert mask.tolist() == [True] and prompt.abs().sum() > 0
    p2, m2 = random_prompt(3, tokens=10, dim=4)
    assert 5 <= int(m2.sum()) <= 9 and torch.equal(p2, random_prompt(3, tokens=10, dim=4)[0])


# --------------------------------------------------------------------------- WorldDataset


@pytest.mark.parametrize(
    "world",
    [
        RevisitWorld(frames_per_segment=2, segments=3, frame_size=8),
        SceneWorld(frames_per_segment=2, segments=3, frame_size=8),
    ],
)
def test_world_dataset_is_deterministic_by_index(world: RevisitWorld | SceneWorld) -> None:
    data = WorldDataset(world, length=5, seed=3)
    assert len(data) == 5
    for i in (0, 4):
        a, b = data[i], WorldDataset(world, length=5, seed=3)[i]
        assert a.keys() == {"video", "actions", "prompt", "prompt_mask"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(data[0]["video"], data[1]["video"])
    assert not torch.equal(data[0]["video"], WorldDataset(world, length=5, seed=4)[0]["video"])
    assert torch.equal(data[-1]["video"], data[4]["video"])
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)))
    assert batch["video"].shape == (2, 3, 2, 3, 8, 8) and batch["actions"].shape == (2, 3, 2, 2)
    assert batch["prompt"].shape == (2, 3, 8, 16) and batch["prompt_mask"].shape == (2, 3, 8)
    with pytest.raises(IndexError):
        data[5]


def test_world_dataset_refuses_a_non_world() -> None:
    with pytest.raises(DataError, match="world must have a sample"):
        WorldDataset(object(), 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- LatentDataset


def _latents(b: int = 2, t: int = 8, c: int = 4, h: int = 3, w: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["pt", "pt-dict", "pt-legacy", "safetensors", "npy"])
def test_latent_dataset_reads_every_format(tmp_path, fmt: str) -> None:
    x = _latents()
    if fmt == "pt":
        path = tmp_path / "a.pt"
        torch.save(x, path)
    elif fmt == "pt-dict":
        path = tmp_path / "a.pt"
        torch.save({"latents": x, "fps": torch.tensor(8)}, path)
    elif fmt == "pt-legacy":
        path = tmp_path / "a.pt"
        torch.save(x, path, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        path = tmp_path / "a.safetensors"
        save_file({"latents": x}, path)
    else:
        path = tmp_path / "a.npy"
        np.save(path, x.numpy())
    data = LatentDataset(path, segment_frames=2, segments=2)
    assert len(data) == 4  # 2 videos x 2 samples of 4 frames
    for i in range(4):
        video, sample = divmod(i, 2)
        want = x[video, sample * 4 : sample * 4 + 4].reshape(2, 2, 4, 3, 5)
        assert torch.equal(data[i]["video"], want)
    assert pickle.loads(pickle.dumps(data))[3]["video"].shape == (2, 2, 4, 3, 5)


def test_latent_dataset_directory_and_lists(tmp_path) -> None:
    torch.save(_latents(b=1, t=4, seed=1), tmp_path / "b.pt")
    np.save(tmp_path / "a.npy", _latents(b=2, t=8, seed=2).numpy())
    (tmp_path / "notes.txt").write_text("not latents")
    data = LatentDataset(tmp_path, segment_frames=4, segments=1)
    assert len(data) == 2 * 2 + 1  # videos may differ in length across files
    assert torch.equal(data[4]["video"][0], _latents(b=1, t=4, seed=1)[0])  # a.npy sorts first
    listed = LatentDataset([tmp_path / "b.pt"], segment_frames=2, segments=2, dtype=torch.float64)
    assert len(listed) == 1 and listed[0]["video"].dtype == torch.float64


def test_latent_dataset_drop_last_is_explicit(tmp_path) -> None:
    torch.save(_latents(b=1, t=10), tmp_path / "a.pt")
    with pytest.raises(DataError) as err:
        LatentDataset(tmp_path / "a.pt", segment_frames=2, segments=2)
    assert "dimension t is 10, not a multiple of segments x segment_frames = 4" in str(err.value)
    assert "the last 2 frames of each video would not fit" in str(err.value) and "drop_last=True" in str(err.value)
    data = LatentDataset(tmp_path / "a.pt", segment_frames=2, segments=2, drop_last=True)
    assert len(data) == 2
    assert torch.equal(data[1]["video"].flatten(0, 1), _latents(b=1, t=10)[0, 4:8])


def _write_bad(tmp_path, case: str):
    if case == "missing":
        return tmp_path / "nope.pt"
    if case == "empty-dir":
        (tmp_path / "readme.md").write_text("x")
        return tmp_path
    if case == "suffix":
        (tmp_path / "a.txt").write_text("x")
        return [tmp_path / "a.txt"]
    if case in ("corrupt-pt", "corrupt-npy", "corrupt-safetensors"):
        path = tmp_path / f"a.{case.split('-')[1]}"
        path.write_bytes(b"\x00\x01garbage" * 10)
        return path
    if case == "pickle-code":
        path = tmp_path / "a.pt"
        torch.save({"latents": _latents(), "config": {"lr": 0.1, "fn": print}}, path)
        return path
    if case == "rank":
        torch.save(torch.zeros(2, 8, 4, 4), tmp_path / "a.pt")
        return tmp_path / "a.pt"
    if case == "int":
        np.save(tmp_path / "a.npy", np.zeros((1, 4, 1, 2, 2), dtype=np.int32))
        return tmp_path / "a.npy"
    if case == "few":
        torch.save(_latents(t=3), tmp_path / "a.pt")
        return tmp_path / "a.pt"
    if case == "nan":
        x = _latents()
        x[1, 5, 0, 0, 0] = float("nan")
        torch.save(x, tmp_path / "a.pt")
        return tmp_path / "a.pt"
    if case == "mismatch":
        torch.save(_latents(), tmp_path / "a.pt")
        torch.save(_latents(h=4), tmp_path / "b.pt")
        return tmp_path
    if case == "keys":
        save_file({"x": _latents(), "y": _latents()}, tmp_path / "a.safetensors")
        return tmp_path / "a.safetensors"
    if case == "empty-b":
        torch.save(torch.zeros(0, 8, 1, 2, 2), tmp_path / "a.pt")
        return tmp_path / "a.pt"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"LatentDataset: .*nope\.pt does not exist"),
        ("empty-dir", r"no latent files \(\.pt, \.pth, \.safetensors, \.npy\) in directory"),
        ("suffix", r"a\.txt has unsupported type '\.txt'"),
        ("corrupt-pt", r"a\.pt: could not read it as a \.pt latent file"),
        ("corrupt-npy", r"a\.npy: could not read it as a \.npy latent file"),
        ("corrupt-safetensors", r"a\.safetensors: could not read it as a \.safetensors latent file"),
        ("pickle-code", r"a\.pt: could not read it as a \.pt latent file \(UnpicklingError"),
        ("rank", r"a\.pt: expected 5 dimensions \(b t c h w\), got 4 with shape \(2, 8, 4, 4\)"),
        ("int", r"a\.npy: expected floating-point latents, got dtype int32"),
        (
            "few",
            r"a\.pt: too few frames: dimension t is 3, but one sample needs segments x segment_frames = 2 x 2 = 4",
        ),
        ("nan", r"a\.pt: non-finite values \(nan or inf\) in video 1, frame 5"),
        ("mismatch", r"b\.pt: mismatched shapes across files: \(c h w\) is \(4, 4, 5\) but .*a\.pt has \(4, 3, 5\)"),
        ("keys", r"holds several tensors \['x', 'y'\] and none is named 'latents'; pass key="),
        ("empty-b", r"a\.pt: holds no videos \(dimension b is 0"),
    ],
)
def test_latent_dataset_errors_name_the_problem(tmp_path, case: str, message: str) -> None:
    path = _write_bad(tmp_path, case)
    with pytest.raises(DataError, match=message):
        LatentDataset(path, segment_frames=2, segments=2)


def test_latent_dataset_checks_items_when_not_checked_eagerly(tmp_path) -> None:
    path = _write_bad(tmp_path, "nan")
    data = LatentDataset(path, segment_frames=2, segments=2, check_finite=False)
    assert torch.isfinite(data[2]["video"]).all()  # video 1, frames 0..3
    with pytest.raises(DataError, match=r"non-finite values \(nan or inf\) in video 1, frame 5"):
        data[3]
    with pytest.raises(DataError, match=r"no tensor named 'z'; the file holds \['x', 'y'\]"):
        LatentDataset(_write_bad(tmp_path, "keys"), segment_frames=2, segments=2, key="z")
    assert len(LatentDataset(tmp_path / "a.safetensors", segment_frames=2, segments=2, key="y")) == 4


def test_data_package_imports_only_torch_numpy_and_memkit_errors() -> None:
    """Optional packages (scikit-image, safetensors) are imported inside functions, when needed."""
    import ast
    from pathlib import Path

    import memkit.data

    allowed = ("torch", "numpy", "memkit.errors", "memkit.data")
    for path in Path(memkit.data.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] in sys.stdlib_module_names:
                    continue
                assert name.startswith(allowed), f"{path.name} imports {name} at module level"
