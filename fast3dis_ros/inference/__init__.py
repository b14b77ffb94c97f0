"""The adapter between the network and the pipeline: Window -> WindowPrediction."""
