"""How a rank's failure is put into words: the lost-peer classifier, the OOM advice, rank 0's summary (pure)."""

import pytest

from albor.rank_failure import (
    OOM_ADVICE,
    classify_lost_peer,
    crash_summary,
    error_record,
    is_cause,
    is_out_of_memory,
)

# The texts as the backends raise them (gloo 2.13 on CPU, measured; NCCL from torch 2.13's
# ProcessGroupNCCL.cpp / NCCLUtils.cpp and NCCL's ncclGetErrorString).
GLOO_CLOSED = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:29537: "
               "Connection closed by peer [127.0.0.1]:55386")
GLOO_RESET = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer"
GLOO_TIMEOUT = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation to complete"
NCCL_REMOTE = ("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:2100, remote process exited or there "
               "was a network error, NCCL version 2.27.5\nncclRemoteError: A call failed possibly due to a network "
               "error or a remote process exiting prematurely.")
NCCL_SYSTEM = ("NCCL error: unhandled system error (run with NCCL_DEBUG=INFO for details), NCCL version 2.27.5\n"
               "ncclSystemError: System call (e.g. socket, malloc) or external library call failed or device error. "
               "It can be also caused by unexpected exit of a remote peer.")
NCCL_WATCHDOG = ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=41, OpType=ALLREDUCE, "
                 "NumelIn=10, NumelOut=10, Timeout(ms)=120000) ran for 120004 milliseconds before timing out.")
NCCL_ABORTED = "NCCL communicator was aborted on rank 1. "
NCCL_ABORTED_TIMEOUT = NCCL_ABORTED + " Original reason for failure was: " + NCCL_WATCHDOG
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
            "1.06 GiB is free. Of the allocated memory 75.31 GiB is allocated by PyTorch")


@pytest.mark.parametrize(("text", "kind"), [
    (GLOO_CLOSED, "exited"), (GLOO_RESET, "exited"), ("Broken pipe", "exited"),
    (NCCL_REMOTE, "exited"), (NCCL_SYSTEM, "exited"),
    (GLOO_TIMEOUT, "timeout"), (NCCL_WATCHDOG, "timeout"),
    ("[Rank 0] Work WorkNCCL(SeqNum=3) timed out in blocking wait.", "timeout"),
    (NCCL_ABORTED, "aborted"), (NCCL_ABORTED_TIMEOUT, "timeout"),  # the abort's own reason wins
    ("Some NCCL operations have failed or timed out.", "timeout"),
    (CUDA_OOM, None), ("fault drill: exception injected in backward on rank 1 at step 3", None), ("", None),
])
def test_lost_peer_words_of_gloo_and_nccl(text, kind):
    assert classify_lost_peer(text) == kind


def test_out_of_memory_is_recognised_by_type_or_words():
    assert is_out_of_memory("OutOfMemoryError", "anything")
    assert is_out_of_memory(("OutOfMemoryError", "RuntimeError"), "")
    assert is_out_of_memory("RuntimeError", "CUDA error: out of memory")
    assert is_out_of_memory("MemoryError", "")
    assert not is_out_of_memory(("RuntimeError", "Exception"), "CUDA error: an illegal memory access was encountered")


def test_an_out_of_memory_record_carries_the_batch_size_advice():
    import torch

    record = error_record(torch.OutOfMemoryError(CUDA_OOM))
    assert record == {"type": "OutOfMemoryError", "message": CUDA_OOM, "advice": OOM_ADVICE}
    assert "--batch-size" in OOM_ADVICE and "gradient_accumulation_steps" in OOM_ADVICE and "global batch" in OOM_ADVICE

    class CudaOOM(torch.OutOfMemoryError):  # a subclass still counts
        pass

    assert error_record(CudaOOM("x"))["advice"] == OOM_ADVICE


def test_other_records_carry_no_advice_and_mark_a_lost_peer():
    assert error_record(ValueError("bad")) == {"type": "ValueError", "message": "bad"}
    assert error_record(RuntimeError(GLOO_CLOSED)) == {"type": "RuntimeError", "message": GLOO_CLOSED, "lost_peer": "exited"}
    assert len(error_record(RuntimeError("x" * 10_000))["message"]) == 2000  # a record stays small


def test_which_peer_records_say_why_the_job_ended():
    assert is_cause({"exit_code": 14, "error": {"type": "OutOfMemoryError", "message": "m"}})
    assert not is_cause({"exit_code": 14, "error": {"type": "RuntimeError", "message": GLOO_CLOSED, "lost_peer": "exited"}})
    assert is_cause({"exit_code": 143})  # a second signal ended it
    assert not is_cause({"exit_code": 14})


def test_a_rank_that_raised_itself_is_blamed_with_its_advice():
    summary = crash_summary(0, {"type": "OutOfMemoryError", "message": "CUDA out of memory.", "advice": OOM_ADVICE}, {})
    assert summary.ranks == (0,) and summary.advice == OOM_ADVICE
    assert summary.message == f"OutOfMemoryError on rank 0: CUDA out of memory. ({OOM_ADVICE})"
    assert crash_summary(1, {"type": "KeyError", "message": "'x'"}, {}).message == "KeyError on rank 1: 'x'"


def test_a_lost_peer_names_the_rank_whose_record_gives_the_cause():
    own = error_record(RuntimeError(GLOO_CLOSED))
    peers = {
        1: {"rank": 1, "exit_code": 14, "error": {"type": "OutOfMemoryError", "message": "CUDA out of memory.",
                                                  "advice": OOM_ADVICE}},
        2: {"rank": 2, "exit_code": 14, "error": {"type": "RuntimeError", "message": GLOO_RESET, "lost_peer": "exited"}},
    }
    summary = crash_summary(0, own, peers)
    assert summary.ranks == (1,) and summary.advice == OOM_ADVICE  # rank 2 only echoes the loss
    assert summary.message.startswith("rank 1 failed (exit 14): OutOfMemoryError: CUDA out of memory. (out of memory:")
    assert "Rank 0 then lost it during a collective (RuntimeError: " in summary.message and GLOO_CLOSED in summary.message


def test_a_lost_peer_without_a_record_blames_no_rank():
    own = error_record(RuntimeError(NCCL_REMOTE))
    summary = crash_summary(0, own, {1: {"rank": 1, "exit_code": 14, "error": {"lost_peer": "exited"}}})
    assert summary.ranks == () and summary.advice is None
    assert summary.message.startswith("lost a peer rank during a collective (RuntimeError: NCCL error")


def test_nccl_error_handling_is_set_unless_the_user_chose():
    from albor.distributed.process_group import NCCL_ERROR_HANDLING, set_nccl_error_handling

    assert NCCL_ERROR_HANDLING == {"TORCH_NCCL_BLOCKING_WAIT": "1"}
    env: dict[str, str] = {}
    assert set_nccl_error_handling(env) == {"TORCH_NCCL_BLOCKING_WAIT": "1"} and env == {"TORCH_NCCL_BLOCKING_WAIT": "1"}
    env = {"TORCH_NCCL_BLOCKING_WAIT": "0"}
    assert set_nccl_error_handling(env) == {"TORCH_NCCL_BLOCKING_WAIT": "0"}
    env = {"NCCL_BLOCKING_WAIT": "0"}  # torch's older spelling is a choice too
    assert set_nccl_error_handling(env) == {"TORCH_NCCL_BLOCKING_WAIT": "0"} and env == {"NCCL_BLOCKING_WAIT": "0"}
