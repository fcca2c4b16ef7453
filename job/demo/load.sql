-- The demo's daily load, run for every (store, day) item by `make run`:
--   bulkjob run --handler sql:job/demo/load.sql --db sqlite:///.cache/demo/demo.db ...
-- :store and :day are bound from the item's payload; {target} is the payload's table name,
-- accepted only when it is one of the names declared below, and sent quoted. Every step is
-- idempotent (delete then insert, upsert), so an item that is tried again repeats nothing.
-- allow target: daily_totals

-- step: stage
DELETE FROM stage_sales WHERE store = :store AND day = :day;
INSERT INTO stage_sales (store, day, amount)
SELECT store, day, amount FROM raw_sales WHERE store = :store AND day = :day;

-- step: aggregate
-- daily_totals refuses a negative total (CHECK): such an item fails for good, and with the
-- default --commit item nothing of it is committed, not even its stage step.
INSERT INTO {target} (store, day, total, sales)
SELECT store, day, SUM(amount), COUNT(*) FROM stage_sales
WHERE store = :store AND day = :day
GROUP BY store, day
ON CONFLICT (store, day) DO UPDATE SET total = excluded.total, sales = excluded.sales;

-- step: publish
INSERT INTO load_audit (store, day, loaded_at) VALUES (:store, :day, CURRENT_TIMESTAMP)
ON CONFLICT (store, day) DO UPDATE SET loaded_at = excluded.loaded_at;
DELETE FROM stage_sales WHERE store = :store AND day = :day;
