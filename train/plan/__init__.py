"""The layout planner: memory per rank and step time of a model under a parallel layout on a cluster, from
formulas (`train.memory` for memory, `train.plan.step_time` for time), before anything is launched."""
