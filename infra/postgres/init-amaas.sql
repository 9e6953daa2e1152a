-- Run once by the postgres image on an empty data volume: the database of the serving fleet's shared state
-- ($AMAAS_STATE_URL: keys, usage, registry, flags, prediction log). amaas applies its own migrations at start.
CREATE DATABASE amaas OWNER airflow;
