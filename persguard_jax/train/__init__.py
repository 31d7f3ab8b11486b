"""The training engine: state, the step factory, the loop, checkpoints, a differentiable inner loop, and
first-order inner steps dispatched ahead of the step."""
from persguard_jax.train.checkpoint import Checkpointer
from persguard_jax.train.dispatch import InnerSteps
from persguard_jax.train.fit import fit
from persguard_jax.train.loop import LoopConfig, TrainingDiverged, TrainResult, train
from persguard_jax.train.optim import OptimizerConfig, make_optimizer
from persguard_jax.train.state import TrainState, create_state, init_state, state_shardings
from persguard_jax.train.step import StepConfig, make_train_step
from persguard_jax.train.unroll import unroll

__all__ = ["Checkpointer", "InnerSteps", "LoopConfig", "OptimizerConfig", "StepConfig", "TrainResult", "TrainState",
           "TrainingDiverged", "create_state", "fit", "init_state", "make_optimizer", "make_train_step",
           "state_shardings", "train", "unroll"]
