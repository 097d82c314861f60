"""Stage-local gradient clipping: the norm of one stage's gradients, no cross-stage collective.

DeepSpeed computes the clipping norm (and bf16/ZeRO's overflow check) with a
collective over the model-parallel group, which spans every pipeline stage: each
stage then waits at its optimizer step for the last stage's drain. Handing the
norm code a grid whose model-parallel group is only this stage's tensor slice
makes every stage clip by its own norm and step on its own.
"""


class StageLocalGrid:
    """DeepSpeed's PipelineParallelGrid, with the pipeline axis hidden from norm computations."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def get_model_parallel_group(self):
        return self._grid.get_slice_parallel_group()

    def get_model_parallel_rank(self):
        return self._grid.get_slice_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._grid.get_slice_parallel_world_size()

    def get_pipe_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_world_size(self):
        return 1


def make_optimizer_stage_local(optimizer, grid):
    """Point a DeepSpeed optimizer wrapper (bf16, ZeRO-1) at the stage-local grid."""
    local = StageLocalGrid(grid)
    if hasattr(optimizer, "mpu"):
        optimizer.mpu = local
    if getattr(optimizer, "model_parallel_group", None) is not None:
        optimizer.model_parallel_group = local.get_model_parallel_group()
        optimizer.model_parallel_rank = local.get_model_parallel_rank()
        optimizer.model_parallel_world_size = local.get_model_parallel_world_size()
    return local
