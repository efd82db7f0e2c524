#!/usr/bin/env bash
# Two nodes x 8 GPUs. Run from the repository root, which must sit at the same path on both nodes.
#   bash deploy/training/launch_2x8.sh check            print the exact commands and check the configs
#   bash deploy/training/launch_2x8.sh deepspeed        on node 0 only: ssh/pdsh starts both nodes
#   bash deploy/training/launch_2x8.sh torchrun RANK    on each node, RANK 0 on 10.0.0.1 and 1 on 10.0.0.2
set -euo pipefail
CONFIG=${CONFIG:-examples/train_lora.yaml}
DS=${DS:-zero2}                    # zero2 when the model fits per GPU; zero3 / zero3_offload when not
HOSTFILE=deploy/training/hostfile
set -a; . deploy/training/.deepspeed_env; set +a  # torchrun: the same NCCL/gloo settings on every node
case "${1:-check}" in
  check)     exec .venv/bin/train "$CONFIG" deepspeed="$DS" hostfile="$HOSTFILE" --dry-run ;;
  deepspeed) cp deploy/training/.deepspeed_env .deepspeed_env   # the launcher exports ./.deepspeed_env to every rank
             exec .venv/bin/train "$CONFIG" deepspeed="$DS" hostfile="$HOSTFILE" launcher=deepspeed ;;
  torchrun)  exec .venv/bin/train "$CONFIG" deepspeed="$DS" hostfile="$HOSTFILE" node_rank="${2:?node rank 0 or 1}" ;;
  *) echo "usage: $0 check | deepspeed | torchrun RANK" >&2; exit 2 ;;
esac
