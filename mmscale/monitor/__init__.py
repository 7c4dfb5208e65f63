"""What a run tells about itself besides its metrics: time, alerts, predictions and readable logs.

Where its time went (timeline), why it ended (alerts), what its model answers (predictions),
and logs a person can read (console)."""
