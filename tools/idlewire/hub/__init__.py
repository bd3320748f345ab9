"""`idlewire hub`: the reference marketplace (registry, control channel, receipts).

Host side: it imports the node's formats from the agent package (receipts, config), never the
reverse. Every fact another hub process needs lives in the database (SQLite by default,
PostgreSQL for several processes behind one database).
"""
