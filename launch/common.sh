# shellcheck shell=bash
# Sourced by the launch scripts (never run on its own). Two jobs:
#   1. run_cmd: run a command, or with DRY_RUN=1 print it shell-quoted instead (the printed line is
#      exactly what would run, so it can be pasted into a shell);
#   2. SLURM allocation helpers: expand a node list, GPUs per node, rendezvous port from the job id.
# Pure bash; sourcing it defines functions and nothing else.

# Print a command line, quoting only the words that need it, with single quotes where possible
# (printf %q alone escapes every comma and bracket: `eval.ks=\[1\,5\]` is hard to read).
quote_cmd() {
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$word "
    elif [[ $word != *"'"* ]]; then
      out+="'$word' "
    else
      out+="$(printf '%q' "$word") "
    fi
  done
  printf '%s\n' "${out% }"
}

# Run "$@", or print it when DRY_RUN=1.
run_cmd() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    quote_cmd "$@"
  else
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 1
}

# Print a script's comment header (its usage), from after the shebang to the first line that is
# not a comment or is an #SBATCH directive.
print_usage() {
  local line
  while IFS= read -r line; do
    [[ $line == '#!'* ]] && continue
    [[ $line == '#'* && $line != '#SBATCH'* ]] || break
    line=${line#\#}
    printf '%s\n' "${line# }"
  done <"$1"
}

# Handle -h/--help (usage on stdout, exit 0) and a missing CONFIG (usage on stderr, exit 2).
# Call as: need_config "${BASH_SOURCE[0]}" "$@"
need_config() {
  local script=$1
  shift
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    print_usage "$script"
    exit 0
  fi
  if [[ $# -lt 1 ]]; then
    print_usage "$script" >&2
    exit 2
  fi
}

# Expand a SLURM node list such as `gpu[01-03,07],cpu5` into one host per line, in order.
# Handles one bracket group per host (prefix[ranges]suffix) with zero-padded ranges; anything more
# exotic needs `scontrol show hostnames`, which slurm_hostnames prefers when it exists.
expand_nodelist() {
  local list=$1 token="" ch depth=0 i part prefix ranges suffix r lo hi n width
  local -a parts=() items=()
  local host_re='^([^][]*)\[([^][]+)\]([^][]*)$'
  # Split on commas that are outside brackets.
  for ((i = 0; i < ${#list}; i++)); do
    ch=${list:i:1}
    case $ch in
      "[") depth=$((depth + 1)) ;;
      "]") depth=$((depth - 1)) ;;
    esac
    if ((depth < 0 || depth > 1)); then
      die "node list '$list': unbalanced or nested brackets"
    fi
    if [[ $ch == "," && $depth == 0 ]]; then
      parts+=("$token")
      token=""
    else
      token+=$ch
    fi
  done
  ((depth == 0)) || die "node list '$list': unbalanced brackets"
  parts+=("$token")
  for part in "${parts[@]}"; do
    [[ -n $part ]] || die "node list '$list': empty host name"
    if [[ $part != *[][]* ]]; then
      printf '%s\n' "$part"
      continue
    fi
    [[ $part =~ $host_re ]] || die "node list '$list': cannot expand '$part' without scontrol"
    prefix=${BASH_REMATCH[1]} ranges=${BASH_REMATCH[2]} suffix=${BASH_REMATCH[3]}
    IFS=, read -ra items <<<"$ranges"
    for r in "${items[@]}"; do
      if [[ $r =~ ^([0-9]+)-([0-9]+)$ ]]; then
        lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]}
        ((10#$lo <= 10#$hi)) || die "node list '$list': range '$r' runs backwards"
        # SLURM keeps the width of the lower bound: gpu[08-10] -> gpu08 gpu09 gpu10.
        width=${#lo}
        for ((n = 10#$lo; n <= 10#$hi; n++)); do
          printf '%s%0*d%s\n' "$prefix" "$width" "$n" "$suffix"
        done
      elif [[ $r =~ ^[0-9]+$ ]]; then
        printf '%s%s%s\n' "$prefix" "$r" "$suffix"
      else
        die "node list '$list': bad range '$r'"
      fi
    done
  done
}

# Hosts of the allocation, one per line: scontrol when present (it knows every syntax), else the
# pure-bash expansion above.
slurm_hostnames() {
  local list=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
  [[ -n $list ]] || die "SLURM_JOB_NODELIST is not set: run inside sbatch/salloc (or set it for DRY_RUN=1)"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$list"
  else
    expand_nodelist "$list"
  fi
}

# GPUs per node: GPUS_PER_NODE, else SLURM's (--gpus-per-node may read "a100:4"), else nvidia-smi.
slurm_gpus_per_node() {
  local g=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}}
  g=${g##*:}
  if [[ -z $g ]] && command -v nvidia-smi >/dev/null 2>&1; then
    g=$(nvidia-smi -L | grep -c '^GPU')
  fi
  [[ $g =~ ^[1-9][0-9]*$ ]] || die "cannot tell GPUs per node (got '$g'): set GPUS_PER_NODE"
  printf '%s\n' "$g"
}

# Rendezvous port: MASTER_PORT if set, else derived from the job id so that two jobs sharing a
# node do not collide, and a requeued job (same id) gets the same port.
slurm_master_port() {
  local job=${SLURM_JOB_ID:?SLURM_JOB_ID is not set}
  [[ $job =~ ^[0-9]+$ ]] || die "SLURM_JOB_ID '$job' is not a number"
  printf '%s\n' "${MASTER_PORT:-$((20000 + 10#$job % 20000))}"
}
