"""The evaluate stage: metrics, scoring, speed, and the report card."""
