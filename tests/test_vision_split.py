"""A request's media items encoded on several GPUs (serving/vision_split.py): the runs each GPU
gets, and that the split answer is the single-encoder one, in the request's order."""

import itertools
import random

import pytest
import torch

from conftest import data_uri, image_bytes, make_image
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.serving.vision_split import (balanced_runs, encode_split, frame_groups, replica_gpus,
                                                  warm_exact_grids)


def test_balanced_runs_is_the_best_contiguous_split():
    """Against every way to cut the items into at most `parts` non-empty runs."""
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 50) for _ in range(rng.randint(1, 7))]
        parts = rng.randint(1, 4)
        runs = balanced_runs(sizes, parts)
        assert runs[0][0] == 0 and runs[-1][1] == len(sizes) and len(runs) <= parts
        assert all(a < b for a, b in runs) and all(r[1] == s[0] for r, s in zip(runs, runs[1:]))
        best = min(max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes))))
                   for k in range(min(parts, len(sizes)))
                   for cuts in itertools.combinations(range(1, len(sizes)), k))
        assert max(sum(sizes[a:b]) for a, b in runs) == best
    assert balanced_runs([3680, 3680], 2) == [(0, 1), (1, 2)]
    assert balanced_runs([100, 10, 10, 10], 2) == [(0, 1), (1, 4)]
    assert balanced_runs([], 2) == [] and balanced_runs([5], 3) == [(0, 1)]
    assert len(balanced_runs([3680] * 384, 2)) == 2            # a long video's frame groups, quickly


def test_frame_groups_are_the_units_of_the_split():
    assert frame_groups([(1, 4, 6), (3, 2, 2), (1, 2, 4)]) == [
        (0, 0, 24), (1, 24, 4), (1, 28, 4), (1, 32, 4), (2, 36, 8)]


def test_each_instance_encodes_on_its_gpu_and_the_next():
    """Instance i of a group starting at GPU `first` takes GPU first + i, then the group's next
    (wrapping), so each GPU holds two ViTs whatever the group's size; one GPU: itself alone."""
    assert replica_gpus(0, 2) == [0, 1] and replica_gpus(1, 2) == [1, 0]
    assert [replica_gpus(i, 8, first=8) for i in (0, 7)] == [[8, 9], [15, 8]]
    held = [g for i in range(8) for g in replica_gpus(i, 8)]
    assert sorted(held) == sorted(list(range(8)) * 2)
    assert replica_gpus(0, 1, first=3) == [3] and replica_gpus(2, 4, limit=4) == [2, 3, 0, 1]


def test_split_encoding_equals_one_encoder(tiny_moe):
    """Three images of different sizes on two 'GPUs' (two replicas of the tiny ViT on CPU): the
    same embeddings and DeepStack levels as one encoder over all of them, in the request's order;
    each replica saw its run only, the helper's before the home one's."""
    from qwen3vl_backend.loader import load_vision_model

    visual = load_vision_model(str(tiny_moe))
    media = Processor(tiny_moe).process_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(w, h, i)))}}
        for i, (w, h) in enumerate([(64, 96), (96, 64), (64, 64)])]}]).media
    pixels, grids = torch.cat([m.pixel_values for m in media]), [m.grid_thw for m in media]
    calls = []

    def replica(name):
        def encode(pix, g):
            calls.append((name, list(g)))
            return visual(pix, g)
        return torch.device("cpu"), encode

    want_e, want_ds = visual(pixels, grids)
    got_e, got_ds = encode_split([replica("home"), replica("helper")], pixels, grids)
    assert got_e.shape == want_e.shape and len(got_ds) == len(want_ds)
    for got, want in zip([got_e, *got_ds], [want_e, *want_ds]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    runs = balanced_runs([t * h * w for t, h, w in grids], 2)
    assert calls == [("helper", grids[runs[1][0]:runs[1][1]]), ("home", grids[runs[0][0]:runs[0][1]])]
    calls.clear()
    encode_split([replica("home"), replica("helper")], media[0].pixel_values, grids[:1])
    assert calls == [("home", grids[:1])]                # one image: the home GPU alone


def test_a_videos_frames_split_across_gpus(tiny_moe, video_file):
    """One video (several frame groups) after an image: its frames are cut between the two
    replicas, each run encoded as its own (t, h, w) grids, and the answer is one encoder's."""
    from qwen3vl_backend.loader import load_vision_model

    pytest.importorskip("av", reason="the video fixture is written with PyAV")
    visual = load_vision_model(str(tiny_moe))
    media = Processor(tiny_moe).process_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(64, 64, 0)))}},
        {"type": "video_url", "video_url": {"url": data_uri(video_file.read_bytes(), "video/mp4")}}]}]).media
    pixels, grids = torch.cat([m.pixel_values for m in media]), [m.grid_thw for m in media]
    assert grids[1][0] >= 3
    calls = []

    def replica(name):
        def encode(pix, g):
            calls.append((name, list(g), pix.shape[0]))
            return visual(pix, g)
        return torch.device("cpu"), encode

    want_e, want_ds = visual(pixels, grids)
    got_e, got_ds = encode_split([replica("home"), replica("helper")], pixels, grids)
    for got, want in zip([got_e, *got_ds], [want_e, *want_ds]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (_, helper, helper_rows), (_, home, home_rows) = calls
    t, h, w = grids[1]
    assert home[0] == grids[0] and all(g[1:] == (h, w) for g in home[1:] + helper)
    assert sum(g[0] for g in home[1:] + helper) == t                     # every frame group once
    assert home_rows + helper_rows == pixels.shape[0]
    # the video alone: its frame groups on both GPUs
    calls.clear()
    video_rows = pixels[media[0].pixel_values.shape[0]:]
    got_e, _ = encode_split([replica("home"), replica("helper")], video_rows, grids[1:])
    torch.testing.assert_close(got_e, visual(video_rows, grids[1:])[0], rtol=1e-5, atol=1e-6)
    (_, helper, _), (_, home, _) = calls
    assert home[0][0] >= 1 and helper[0][0] >= 1 and home[0][0] + helper[0][0] == t


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_split_encoding_on_two_gpus(tiny_moe):
    """The tiny ViT on two GPUs (CUDA graphs on each), either GPU first: the split answer lands on
    the GPU asked for and matches one GPU's; so does one image's, encoded on the other GPU."""
    from qwen3vl_kernels.varlen_attention import varlen_attention
    from qwen3vl_backend.engine.vision_graphs import VisionGraphs
    from qwen3vl_backend.loader import load_vision_model

    replicas = []
    for i in range(2):
        device = torch.device(f"cuda:{i}")
        with torch.cuda.device(device):
            visual = load_vision_model(str(tiny_moe), device, torch.bfloat16)
            visual.attn_fn = varlen_attention
            graphs = VisionGraphs(visual, buckets=(256, 1024))
            graphs.capture()
        replicas.append((device, lambda pix, g, d=device, enc=graphs: enc(pix.to(d), g)))
    media = Processor(tiny_moe).process_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(w, h, i)))}}
        for i, (w, h) in enumerate([(64, 96), (96, 64), (64, 64)])]}]).media
    pixels = torch.cat([m.pixel_values for m in media]).bfloat16()
    grids = [m.grid_thw for m in media]
    want_e, want_ds = replicas[0][1](pixels, grids)
    # the second instance's order (its own GPU first), with the outputs on the llm's GPU (cuda:0)
    for order, n in (([0, 1], 3), ([1, 0], 3), ([1, 0], 1)):
        patches = sum(t * h * w for t, h, w in grids[:n])
        got_e, got_ds = encode_split([replicas[i] for i in order], pixels[:patches], grids[:n], torch.device("cuda:0"))
        assert got_e.device == torch.device("cuda:0") and all(d.device == got_e.device for d in got_ds)
        rows = got_e.shape[0]
        for got, want in zip([got_e, *got_ds], [want_e[:rows], *(d[:rows] for d in want_ds)]):
            assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-2


def test_warm_up_meets_each_grid_alone_on_every_replica():
    """--vit-warmup-sizes: each replica encodes each grid by itself (a request's one image, or
    one of two split over two replicas) three times: planned, captured, replayed."""
    calls = []
    replicas = [(torch.device("cpu"), lambda pix, g, r=r: calls.append((r, tuple(pix.shape), pix.dtype, g)))
                for r in range(2)]
    warm_exact_grids(replicas, [(1, 46, 80), (1, 68, 120)], 768)
    want = [(r, (h * w, 768), torch.uint8, [(1, h, w)]) for _, h, w in ((1, 46, 80), (1, 68, 120))
            for r in range(2) for _ in range(3)]
    assert calls == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (exact-grid graphs)")
def test_warmed_grid_is_replayed_on_its_first_request(tiny_moe):
    """After the warm-up, the first request of a warmed size replays its exact-grid graph, and
    matches the eager encoder."""
    from qwen3vl_backend.engine.vision_graphs import VisionGraphs
    from qwen3vl_backend.loader import load_vision_model
    from qwen3vl_backend.processing.vision_inputs import (VisionProcessingConfig, expand_image_rows, image_grid,
                                                           normalize_patches)

    cfg = VisionProcessingConfig.from_dir(tiny_moe)
    visual = load_vision_model(str(tiny_moe), torch.device("cuda"), torch.bfloat16)
    graphs = VisionGraphs(visual, buckets=(256,))
    graphs.capture()

    def rows(pix):
        return expand_image_rows(normalize_patches(pix, cfg), cfg).bfloat16()

    replica = (torch.device("cuda"), lambda pix, g: graphs(rows(pix), g))
    grid = image_grid(640, 480, cfg)
    assert grid[1] * grid[2] > 256                           # past the buckets: an exact grid
    warm_exact_grids([replica], [grid], cfg.patch_width // cfg.temporal_patch_size)
    pix = torch.randint(0, 256, (grid[1] * grid[2], cfg.patch_width // cfg.temporal_patch_size), dtype=torch.uint8,
                        device="cuda")
    got, _ = replica[1](pix, [grid])
    assert graphs.last_path == "replay"
    want, _ = visual(rows(pix), [grid])
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-2
