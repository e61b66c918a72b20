-- Starts of the metadata server, counted durably at each start: write lease epochs granted
-- after a start begin above every epoch granted before it (see MetaService::lease_floor),
-- so an epoch whose grant a power cut took back is never handed out again.
INSERT INTO counters (name, value) VALUES ('boot', 0);
