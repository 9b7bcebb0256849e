#!/usr/bin/env bash
# The pre-training recipe chained end to end: stable phase -> anneal phase (initialised from the
# stable run's latest checkpoint) -> evaluation of the annealed model. Prepare the data first
# (`cprec prepare ${PREFIX}.yaml` or launch/prepare.slurm).
#
#   launch/phases.sh [PREFIX] [key=value overrides for every stage...]
#   launch/phases.sh configs/food_kitchen train.micro_batch_size=4
#   LAUNCHER=slurm launch/phases.sh configs/food_kitchen    # three sbatch jobs chained by afterok
#   DRY_RUN=1 launch/phases.sh                               # print every stage, run nothing
#
# PREFIX (default configs/food_kitchen) names ${PREFIX}_stable.yaml and ${PREFIX}_anneal.yaml; the
# evaluation reads the anneal config. Environment:
#   LAUNCHER     local (default: launch/train_local.sh, then cprec eval) | slurm (sbatch + afterok)
#   STAGES       which stages to run, in order (default "stable anneal eval")
#   STABLE_CONFIG / ANNEAL_CONFIG / EVAL_CONFIG    other config files
#   STABLE_OUT / ANNEAL_OUT   run folders (default out/runs/<name>_stable, out/runs/<name>_anneal)
#   EVAL_OUT     report folder (default out/eval/<name>)
#   DRY_RUN=1    print each stage's command instead of running it (passed on to train_local.sh)
# Rerunning is safe: each training phase resumes from its own latest checkpoint. Overrides given
# here apply to every stage; the folders that chain the stages are set last so they always agree.
set -euo pipefail
launch_dir=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=SCRIPTDIR/common.sh
source "$launch_dir/common.sh"
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  print_usage "${BASH_SOURCE[0]}"
  exit 0
fi

prefix=configs/food_kitchen
if [[ $# -gt 0 && $1 != *=* ]]; then
  prefix=${1%.yaml}
  shift
fi
name=$(basename "$prefix")
stable_cfg=${STABLE_CONFIG:-${prefix}_stable.yaml}
anneal_cfg=${ANNEAL_CONFIG:-${prefix}_anneal.yaml}
eval_cfg=${EVAL_CONFIG:-$anneal_cfg}
stable_out=${STABLE_OUT:-out/runs/${name}_stable}
anneal_out=${ANNEAL_OUT:-out/runs/${name}_anneal}
eval_out=${EVAL_OUT:-out/eval/${name}}
launcher=${LAUNCHER:-local}
read -ra stages <<<"${STAGES:-stable anneal eval}"
[[ $launcher == local || $launcher == slurm ]] || die "LAUNCHER must be local or slurm, got '$launcher'"
for stage in "${stages[@]}"; do
  [[ $stage =~ ^(stable|anneal|eval)$ ]] || die "unknown stage '$stage' in STAGES (stable, anneal, eval)"
  cfg_var=${stage}_cfg
  [[ -f ${!cfg_var} ]] || die "$stage config not found: ${!cfg_var} (set ${stage^^}_CONFIG)"
done

stage_args() { # the cprec arguments of one stage: config, the user's overrides, then the chaining
  case $1 in
    stable) args=("$stable_cfg" "${@:2}" "train.output_dir=$stable_out") ;;
    anneal) args=("$anneal_cfg" "${@:2}" "train.output_dir=$anneal_out"
      "train.init_from=$stable_out/checkpoints/latest") ;;
    eval) args=("$eval_cfg" "${@:2}" "train.output_dir=$anneal_out"
      "eval.checkpoint=$anneal_out/final" "eval.output_dir=$eval_out") ;;
  esac
}

# LAUNCHER=slurm: submit and remember the job id, so the next stage starts only after it succeeds.
prev_job=""
submit() { # submit STAGE SCRIPT ARGS...
  local stage=$1 script=$2 job
  shift 2
  local sb=(sbatch --parsable "--job-name=cprec-$stage")
  if [[ -n $prev_job ]]; then sb+=("--dependency=afterok:$prev_job"); fi
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    quote_cmd "${sb[@]}" "$script" "$@"
    job="${stage^^}_JOB_ID"
  else
    job=$("${sb[@]}" "$script" "$@")
    job=${job%%;*} # --parsable prints "id" or "id;cluster"
    echo "# submitted $stage as job $job"
  fi
  prev_job=$job
}

n=0
for stage in "${stages[@]}"; do
  n=$((n + 1))
  stage_args "$stage" "$@"
  echo "# stage $n/${#stages[@]}: $stage"
  if [[ $launcher == slurm ]]; then
    case $stage in
      eval) submit "$stage" "$launch_dir/eval.slurm" "${args[@]}" ;;
      *) submit "$stage" "$launch_dir/train.slurm" "${args[@]}" ;;
    esac
  else
    case $stage in
      eval) run_cmd "${PYTHON:-python}" -m cprec.cli eval "${args[@]}" ;;
      *) "$launch_dir/train_local.sh" "${args[@]}" ;;
    esac
  fi
done
