"""Speed and accuracy measurements (bench.py runs them); nothing else imports these."""
