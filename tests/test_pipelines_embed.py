"""The embedding job on real Ray Data and real shards, with the tiny random CLIP."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from capenext.cli import UsageError
from capenext.config import DataCfg, load_preset, override
from capenext.data.embeddings import check_tables, load_bank
from capenext.data.shards import ShardIndex
from capenext.data.transforms import crop
from capenext.models.clip import FrozenCLIP, class_prompt
from capenext.noise import load_template_maps, typo
from pipelines import embed
from pipelines.clip_tables import cpu_plan, plan_actors
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def embedded(prepared, ray_local, tmp_path_factory):
    """The job over the session's shards (read only), with two typo rates, into a folder of its own:
    ``(shards, tables, the job's result)``."""
    shards, emb = prepared / "shards", tmp_path_factory.mktemp("embed") / "emb"
    meta = embed.run(shards, emb, load_preset("tiny"), batch_size=32, typo_rates=(0.1, 0.3), progress=False,
                     device="cpu")
    return shards, emb, meta


def test_row_counts_match_the_shards(embedded):
    shards, emb, meta = embedded
    index = ShardIndex(shards)
    images = pq.read_table(emb / "images.parquet")
    classes = pq.read_table(emb / "classes.parquet")
    kps = pq.read_table(emb / "keypoints.parquet")
    n_kp = sum(c.num_keypoints for c in index.categories.values())
    variants = 1 + 2 + len(load_template_maps())
    assert images.num_rows == len(index.samples)
    assert sorted(images.column("ann_id").to_pylist()) == sorted(s.ann_id for s in index.samples)
    assert classes.num_rows == len(index.categories)
    assert kps.num_rows == n_kp * variants
    assert meta["counts"] == {"images": images.num_rows, "classes": classes.num_rows, "keypoints": kps.num_rows}
    assert json.loads(images.schema.metadata[b"capenext"])["clip_model"] == "tiny"


def test_embeddings_equal_an_in_process_clip_forward(embedded):
    shards, emb, _ = embedded
    index = ShardIndex(shards)
    clip = FrozenCLIP("tiny", "random")
    bank = load_bank(emb)
    samples = index.samples[::97][:6]
    crops = torch.from_numpy(np.stack([crop(index.load_image(s), s.bbox, 128, DataCfg.bbox_scale).image
                                       for s in samples]))
    expected = clip.encode_image(crops)
    got = torch.stack([bank.images[s.ann_id] for s in samples])
    assert torch.allclose(got, expected, atol=1e-5)

    cat = next(iter(index.categories.values()))
    assert torch.allclose(bank.keypoints[cat.id], clip.encode_text(list(cat.keypoints)), atol=1e-5)
    assert torch.allclose(bank.classes[cat.id], clip.encode_text([class_prompt(cat.name)])[0], atol=1e-5)
    assert torch.allclose(bank.keypoints[cat.id].norm(dim=-1), torch.ones(cat.num_keypoints), atol=1e-5)


def test_noisy_variants_hold_the_noise_module_texts(embedded):
    shards, emb, _ = embedded
    index = ShardIndex(shards)
    kps = pq.read_table(emb / "keypoints.parquet").to_pandas()
    cat = next(iter(index.categories.values()))
    rows = kps[(kps.category_id == cat.id) & (kps.variant == "typo@0.3")].sort_values("keypoint_index")
    assert rows.text.tolist() == [typo(t, 0.3, 0) for t in cat.keypoints]
    noisy = load_bank(emb, variant="typo@0.3", images=False)
    assert noisy.images == {}
    assert not torch.allclose(noisy.keypoints[cat.id], load_bank(emb, images=False).keypoints[cat.id])
    with pytest.raises(KeyError, match="available"):
        load_bank(emb, variant="typo@0.9")


def test_rerun_is_a_no_op_and_metadata_mismatch_is_refused(embedded, capsys):
    shards, emb, meta = embedded
    before = (emb / "images.parquet").stat().st_mtime_ns
    again = embed.run(shards, emb, load_preset("tiny"), batch_size=32, typo_rates=(0.1, 0.3))
    assert "up to date" in capsys.readouterr().out
    assert again == json.loads((emb / "embeddings.json").read_text())
    assert (emb / "images.parquet").stat().st_mtime_ns == before
    digest = ShardIndex(shards).digest
    check_tables(emb, load_preset("tiny"), digest)
    with pytest.raises(ValueError, match="clip_model='tiny'"):
        check_tables(emb, override(load_preset("tiny"), {"model.clip_model": "ViT-B-32"}), digest)
    with pytest.raises(ValueError, match="image_size=128"):
        check_tables(emb, override(load_preset("tiny"), {"data.image_size": "256"}), digest)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_device_picks_cpu_actors_and_refuses_cuda_without_a_gpu(ray_local):
    assert plan_actors().device == "cpu"  # the default follows the cluster: no GPU here
    plan = plan_actors("cpu", actors=1)
    assert (plan.device, plan.actors) == ("cpu", 1) and 0 < plan.cpus_per_actor <= 1
    with pytest.raises(UsageError, match="--device cuda: the Ray cluster has no GPU"):
        plan_actors("cuda")


def test_cpu_actors_and_a_read_task_fit_the_cluster_together():
    """A pool that leaves the shards' read tasks no room waits forever: on one CPU the default read task (one
    CPU) beside an actor would never start. The quickstart's test runs the pool on a one-CPU Ray."""
    for cpus in (1, 1.5, 2, 4, 16):
        for actors in (None, 1, 3, 8):
            plan = cpu_plan(cpus, actors)
            assert plan.actors == (actors or max(1, int(cpus) - 1)), (cpus, actors)
            assert 0.1 <= plan.cpus_per_actor <= 1 and 0.1 <= plan.cpus_per_read <= 1, plan
            assert plan.actors * plan.cpus_per_actor + plan.cpus_per_read <= cpus + 1e-9, plan
    assert cpu_plan(16) == cpu_plan(16, 15) and cpu_plan(16).cpus_per_actor == 1.0  # a whole CPU when there is one
    assert (cpu_plan(1).cpus_per_actor, cpu_plan(1).cpus_per_read) == (0.5, 0.5)
    with pytest.raises(UsageError, match=r"--actors 10: a cluster of 1 CPU holds at most 9 CPU actors"):
        cpu_plan(1, 10)


def test_help_names_the_shared_flags():
    proc = run_cli("pipelines.embed", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--encode-batch-size", "--typo-rate ", "--noise-seed", "--device", "--address", "--config",
                 "--set"):
        assert flag in proc.stdout, flag
    assert "--typo-rates" not in proc.stdout and "--batch-size " not in proc.stdout
