-- The index of queued rows by run (`deliveries_run`) goes (issue 14). Only stopping a run read it
-- (`Queue::drop_queued_for_run`); every queued row wrote it twice, when the intake inserted it
-- and when its promotion (a non-HOT update) wrote the row's new version, and a run's rows share
-- one key, so each entry went into a posting list. `scripts/pg-queue-floor.sh` (20,000
-- completions, 200 runs): today's completions and promotions took 2.24 / 2.30 / 2.50 s with it
-- and 1.82 / 1.82 / 1.73 s without (WAL 2,652 against 2,537 bytes an event). A stop now reads
-- the queued rows through the chain index (`deliveries_key`, the same predicate): 3.5 ms for
-- 20,000 queued rows among 200,000, as SQLite's store does.
DROP INDEX IF EXISTS deliveries_run;
