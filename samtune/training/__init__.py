"""Training: the LightningModule, schedules and the data module."""
