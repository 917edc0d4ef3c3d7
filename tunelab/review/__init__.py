"""`tunelab review`: blind side-by-side human review of two models' answers.

tunelab review A B --prompts FILE      generate both models' answers, then open the page
tunelab review A --baseline --prompts FILE     A against the model it started from
tunelab review --report DIR            win rate with a 95% interval, agreement, per prompt
tunelab review --export DIR --format preference --output FILE

store.py    the review folder: items (prompt, answer A, answer B) and ratings, in SQLite
answers.py  the answers of runs, exported folders, and a run's starting model
report.py   win rate and interval, agreement between reviewers, the per-prompt table, export
app.py      the page (FastAPI): one prompt, two answers in random order, A/B/tie/skip
"""
