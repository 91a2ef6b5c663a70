"""Training of the stage-1 head: objective, optimiser/schedule, the train_cached loop."""
