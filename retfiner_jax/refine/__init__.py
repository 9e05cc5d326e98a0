"""RetFiner's refinement: the four objectives, their sampling, the train step, validation and the trainer."""
