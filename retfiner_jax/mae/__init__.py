"""MAE pretraining: how RETFound and UrFound made their FMs (the demo's stage 1 and control)."""
