# Shared by train.sbatch and translate.sbatch (sourced): ranks per node, the rendezvous, and what a
# failed step means on several nodes.
#
# MCAT_PROCS_PER_NODE  processes per node (default: the node's GPU count, or 2 without GPUs)
# MCAT_MASTER_ADDR     rendezvous address (default: the first node's NodeAddr as SLURM knows it, an
#                      address the other nodes reach; a host name may resolve to 127.0.1.1 on itself)
# MCAT_MASTER_PORT     rendezvous port (default: 20000 + job id % 20000)
# MCAT_RENDEZVOUS_TIMEOUT  seconds a rank waits to reach the rendezvous before it fails naming it (300)
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  the interface for gloo / NCCL bootstrap sockets (default:
#                      the one each node reaches the rendezvous address through)
# MCAT_NODE_FAIL_WAIT  seconds to wait, after a failed step on a node that no longer answers, for
#                      SLURM to end the job as NODE_FAIL and requeue it (default: 2 x SlurmdTimeout + 60)

mcat_procs_per_node() {
    local gpus
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
    echo "${MCAT_PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 2 ))}"
}

mcat_rendezvous() {
    local first address
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    address=$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    MASTER_ADDR=${MCAT_MASTER_ADDR:-${address:-$first}}
    MASTER_PORT=${MCAT_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    MCAT_RENDEZVOUS_TIMEOUT=${MCAT_RENDEZVOUS_TIMEOUT:-300}
    export MASTER_ADDR MASTER_PORT MCAT_RENDEZVOUS_TIMEOUT
}

# After a failed step: true when a node of the job cannot run a step within MCAT_NODE_PROBE_TIMEOUT
# seconds (30) any more (a dead node cannot).
mcat_lost_a_node() {
    (( ${SLURM_JOB_NUM_NODES:-1} > 1 )) || return 1
    timeout "${MCAT_NODE_PROBE_TIMEOUT:-30}" srun --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES" true >/dev/null 2>&1 && return 1
    return 0
}

# A dead node: SLURM notices within its SlurmdTimeout, ends this job as NODE_FAIL and, since the job
# is --requeue, starts it again on the nodes it has left, where it resumes. Wait for that (SLURM
# ends this script) instead of ending as a plain failure first; exit with the step's code if it does not.
mcat_wait_for_requeue() {
    local code=$1 slurmd_timeout wait
    slurmd_timeout=$(scontrol show config | awk '/^SlurmdTimeout/ {print $3}')
    wait=${MCAT_NODE_FAIL_WAIT:-$(( 2 * ${slurmd_timeout:-300} + 60 ))}
    echo "mcat: a node of job $SLURM_JOB_ID does not answer; waiting up to $wait s for SLURM to requeue the job"
    sleep "$wait"
    echo "mcat: SLURM did not requeue job $SLURM_JOB_ID; failing with the step's exit code $code"
    exit "$code"
}
