-- Every file a message has carried, in any version (a message:modify may replace its files):
-- the key was (conv_id, message_id, ordinal), so a file put at an ordinal that an earlier
-- version used was never recorded, and participants other than its uploader could not
-- download it (GET /api/attachments/{sha256}, GET /federation/v1/blobs/{sha256}). With the
-- SHA-256 in the key each (ordinal, file) pair is recorded once, and earlier files stay
-- downloadable by those who could see them, as the log still names them.
alter table attachments drop constraint attachments_pkey;
alter table attachments add primary key (conv_id, message_id, ordinal, sha256);
