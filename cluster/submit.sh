#!/usr/bin/env bash
# Submit `mcis train-cls` for an experiment config to a Ray cluster as a Ray job.
# Run `cluster/submit.sh --help` for the options; cluster/README.md has the whole workflow.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: cluster/submit.sh [OPTIONS] CONFIG [KEY=VALUE ...]

Submit `mcis train-cls --config CONFIG name=RUN [KEY=VALUE ...]` to a Ray cluster with
`ray job submit`. The repository is shipped as the job's working directory (the runtime env
cluster/runtime_env.yaml), so CONFIG must be a file inside it. KEY=VALUE are config overrides,
e.g. train.epochs=1 model.weights=/home/ray/weights/vgg16-397923af.pth.

The run name is stable, so submitting the same config again resumes that run from its
checkpoints; the Ray submission id is <run name>-<UTC timestamp>, unique per submission.

Options:
  -a, --address URL       Ray dashboard address (default: $RAY_ADDRESS, else
                          http://127.0.0.1:8265, e.g. through `ray dashboard CLUSTER.yaml`)
  -n, --name NAME         run name (default: the config's `name`, plus -SUFFIX if given)
  -s, --suffix SUFFIX     append -SUFFIX to the config's name (a variant: same config, new run)
  -r, --runtime-env FILE  runtime env YAML (default: cluster/runtime_env.yaml)
      --no-wait           return once submitted (then: ray job logs --follow ID)
      --dry-run           print the command instead of running it
  -h, --help              show this help

Environment: RAY_ADDRESS (default address), RAY (the ray command, default: ray).
Credentials never go on this command line: the cluster's nodes reach S3 through their own
role (instance profile, IRSA) or environment.

Examples:
  cluster/submit.sh configs/voc12_vgg16.yaml
  cluster/submit.sh -s lr2x configs/voc12_vgg16.yaml train.lr=2.0e-3
  cluster/submit.sh --address http://10.0.0.5:8265 configs/lid20_resnet38.yaml \
      model.weights=/home/ray/weights/resnet38_ilsvrc.pth
EOF
}

die() {
    printf 'submit.sh: error: %s\n' "$1" >&2
    printf "Run 'cluster/submit.sh --help' for usage.\n" >&2
    exit 2
}

need_value() {  # need_value OPTION REMAINING_ARG_COUNT
    [[ $2 -ge 2 ]] || die "$1 needs a value"
}

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
name=""
suffix=""
runtime_env=""
wait_flag=()
dry_run=0
config=""
overrides=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        -a | --address) need_value "$1" $#; address="$2"; shift 2 ;;
        --address=*) address="${1#*=}"; shift ;;
        -n | --name) need_value "$1" $#; name="$2"; shift 2 ;;
        --name=*) name="${1#*=}"; shift ;;
        -s | --suffix) need_value "$1" $#; suffix="$2"; shift 2 ;;
        --suffix=*) suffix="${1#*=}"; shift ;;
        -r | --runtime-env) need_value "$1" $#; runtime_env="$2"; shift 2 ;;
        --runtime-env=*) runtime_env="${1#*=}"; shift ;;
        --no-wait) wait_flag=(--no-wait); shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        -*) die "unknown option '$1'" ;;
        *)
            if [[ -z "$config" ]]; then config="$1"; else overrides+=("$1"); fi
            shift
            ;;
    esac
done
while [[ $# -gt 0 ]]; do  # after --
    if [[ -z "$config" ]]; then config="$1"; else overrides+=("$1"); fi
    shift
done

[[ -n "$config" ]] || die "no CONFIG given"
[[ -f "$config" ]] || die "config file not found: $config"
[[ -n "$address" ]] || die "--address is empty"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
config_abs="$(cd "$(dirname "$config")" && pwd -P)/$(basename "$config")"
case "$config_abs" in
    "$repo"/*) config_rel="${config_abs#"$repo"/}" ;;
    *) die "$config is outside the repository $repo: the job only sees the repository (its working_dir)" ;;
esac

if [[ -z "$runtime_env" ]]; then
    runtime_env="$repo/cluster/runtime_env.yaml"
fi
[[ -f "$runtime_env" ]] || die "runtime env file not found: $runtime_env"
runtime_env="$(cd "$(dirname "$runtime_env")" && pwd -P)/$(basename "$runtime_env")"

# Overrides: KEY=VALUE only; a `name=` override is the run name (never passed twice).
passed=()
for item in ${overrides[@]+"${overrides[@]}"}; do
    [[ "$item" == *=* && "${item%%=*}" != "" ]] || die "override '$item' is not KEY=VALUE"
    if [[ "${item%%=*}" == "name" ]]; then
        [[ -z "$name" ]] || die "give the run name once (--name or name=...)"
        name="${item#name=}"
    else
        passed+=("$item")
    fi
done

if [[ -z "$name" ]]; then
    # The config's top-level `name:` (configs keep it on one line: `name: voc12_vgg16`).
    name="$(sed -n -E 's/^name:[[:space:]]*["'\'']?([A-Za-z0-9_.-]+)["'\'']?[[:space:]]*(#.*)?$/\1/p' \
        "$config_abs" | head -n 1)"
    [[ -n "$name" ]] || die "$config has no top-level 'name:'; give --name"
    if [[ -n "$suffix" ]]; then name="$name-$suffix"; fi
elif [[ -n "$suffix" ]]; then
    die "--suffix extends the config's name; with --name give the whole name"
fi
[[ "$name" =~ ^[A-Za-z0-9_.-]+$ && "$name" != "." && "$name" != ".." ]] ||
    die "run name '$name' must be of [A-Za-z0-9_.-] only"

submission_id="$name-$(date -u +%Y%m%d-%H%M%S)"
cmd=("${RAY:-ray}" job submit --address "$address" --runtime-env "$runtime_env"
    --submission-id "$submission_id" ${wait_flag[@]+"${wait_flag[@]}"}
    -- mcis train-cls --config "$config_rel" "name=$name" ${passed[@]+"${passed[@]}"})

# The runtime env's working_dir "." is the directory ray job submit runs in: the repository.
cd "$repo"
if [[ $dry_run -eq 1 ]]; then
    printf '(cd %q &&' "$repo"
    printf ' %q' "${cmd[@]}"
    printf ')\n'
    exit 0
fi
command -v "${RAY:-ray}" >/dev/null 2>&1 ||
    die "'${RAY:-ray}' not found: activate the environment with ray[default] (. .venv/bin/activate)"
printf 'submit.sh: run %s, submission %s, cluster %s\n' "$name" "$submission_id" "$address" >&2
exec "${cmd[@]}"
