import type { ColumnType, Generated } from 'kysely';

/**
 * Kysely table types of the schema in src/store/migrations. `Generated` columns have
 * database defaults; int8 columns arrive as JS numbers (see db.ts).
 */
type Timestamp = ColumnType<Date, Date | string, Date | string>;
type GeneratedTimestamp = ColumnType<Date, Date | string | undefined, Date | string>;
type Json = ColumnType<any, string, string>;

export interface UsersTable {
  id: Generated<number>;
  address: string;
  name: Generated<string>;
  common_name: Generated<string>;
  type: Generated<string>;
  status: Generated<string>;
  timezone: Generated<string>;
  password_hash: string | null;
  is_admin: Generated<boolean>;
  created_at: GeneratedTimestamp;
}

/** A user's stream position (migration 039_user_streams.sql): the last sequence number of their events. */
export interface UserStreamsTable {
  user_id: number;
  seq: Generated<number>;
}

export interface SessionsTable {
  id: string;
  token_hash: string;
  user_id: number;
  kind: 'cookie' | 'bearer';
  device: Generated<string>;
  ip: Generated<string>;
  created_at: GeneratedTimestamp;
  last_seen_at: GeneratedTimestamp;
  expires_at: Timestamp;
  revoked_at: Timestamp | null;
}

export interface LoginFailuresTable {
  id: Generated<number>;
  address: string;
  ip: string;
  at: GeneratedTimestamp;
}

export interface ConversationsTable {
  id: Generated<number>;
  key: string;
  draft_key: string | null;
  creator: string;
  leader: string;
  published: boolean;
  published_at: Timestamp | null;
  created_at: Timestamp;
  subject: string;
  subject_head: number;
  subject_lock_by: string | null;
  subject_lock_at: Timestamp | null;
  subject_lock_id: number | null;
  expiry: Timestamp | null;
  expiry_head: number;
  last_id: number;
  last_hash: string | null;
  last_ts: Timestamp | null;
  message_count: number;
  search_header: unknown;
  org_id: ColumnType<number | null, number | null | undefined, number | null>;
}

export interface ActionsTable {
  conv_id: number;
  id: number;
  act: string;
  actor: string;
  ts: Timestamp;
  component: string | null;
  hash: string;
  body: Json;
}

export interface MessagesTable {
  conv_id: number;
  id: number;
  author: string;
  body: string;
  format: string;
  parent: number | null;
  files: Json;
  created_ts: Timestamp;
  updated_ts: Timestamp | null;
  deleted: boolean;
  head: number;
  lock_by: string | null;
  lock_at: Timestamp | null;
  lock_id: number | null;
  source: Json | null;
  search: unknown;
}

export interface ParticipantsTable {
  conv_id: number;
  address: string;
  user_id: number | null;
  perms: 'full' | 'write' | 'read';
  added_id: number;
  head: number;
  removed_id: number | null;
  seen_id: Generated<number>;
  inbox: Generated<boolean>;
  deleted: Generated<boolean>;
  spam: Generated<boolean>;
  seen: Generated<boolean>;
  muted: Generated<boolean>;
  last_event_ts: Timestamp | null;
  snapshot: Json | null;
}

export interface LabelsTable {
  id: Generated<number>;
  user_id: number;
  name: string;
  color: Generated<string>;
  ordering: Generated<number>;
  description: Generated<string>;
}

export interface ConversationLabelsTable {
  label_id: number;
  conv_id: number;
  user_id: number;
}

export interface UserEventsTable {
  user_id: number;
  seq: number;
  conv_id: number;
  kind: string;
  action_id: number | null;
  payload: Json | null;
  created_at: GeneratedTimestamp;
}

export interface BlobsTable {
  sha256: string;
  size: number;
  content_type: Generated<string>;
  uploaded_by: number | null;
  created_at: GeneratedTimestamp;
}

export interface AttachmentsTable {
  conv_id: number;
  message_id: number;
  ordinal: number;
  sha256: string;
  name: string;
  content_type: string;
  size: number;
  content_id: string | null;
  inline: boolean;
}

export interface EmailMessagesTable {
  id: Generated<number>;
  conv_id: number;
  message_id: string;
  direction: 'in' | 'out';
  action_id: number | null;
  created_at: GeneratedTimestamp;
}

export interface InboundEmailsTable {
  id: Generated<number>;
  raw_sha256: string;
  mail_from: Generated<string>;
  rcpt_to: string[];
  remote_ip: Generated<string>;
  helo: Generated<string>;
  received_at: GeneratedTimestamp;
  status: 'received' | 'ingested' | 'duplicate' | 'failed';
  conv_id: number | null;
  error: string | null;
  auth: Json | null;
}

export type DeliveryState = 'pending' | 'sending' | 'sent' | 'delivered' | 'read' | 'replied' | 'failed' | 'cancelled';

export interface DeliveriesTable {
  id: Generated<number>;
  conv_id: number | null;
  action_id: number | null;
  plugin: string;
  destination: string;
  state: Generated<DeliveryState>;
  attempts: Generated<number>;
  next_attempt_at: GeneratedTimestamp;
  expires_at: Timestamp | null;
  last_error: string | null;
  provider_ref: string | null;
  idempotency_key: string;
  payload: Json;
  locked_by: string | null;
  locked_until: Timestamp | null;
  created_at: GeneratedTimestamp;
  updated_at: GeneratedTimestamp;
  org_id: ColumnType<number | null, number | null | undefined, number | null>;
  outbound_message_id: ColumnType<number | null, number | null | undefined, number | null>;
  contact_id: ColumnType<number | null, number | null | undefined, number | null>;
  blast_id: ColumnType<number | null, number | null | undefined, number | null>;
  chain: ColumnType<string[] | null, string[] | null | undefined, string[] | null>;
  chain_index: Generated<number>;
  destinations: ColumnType<Record<string, string> | null, string | null | undefined, string | null>;
  fallback_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  sent_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  delivered_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  read_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  replied_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  idempotency_base: ColumnType<string | null, string | null | undefined, string | null>;
  step_started_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  fallback_policy: ColumnType<{ not_delivered_s?: number; not_read_s?: number } | null, string | null | undefined, string | null>;
}

export interface OrganisationsTable {
  id: Generated<number>;
  slug: string;
  name: string;
  user_id: number;
  default_chain: ColumnType<string[], string[] | undefined, string[]>;
  fallback: ColumnType<{ not_delivered_s?: number; not_read_s?: number }, string | undefined, string>;
  plugin_config: ColumnType<Record<string, Record<string, unknown>>, string | undefined, string>;
  quota_per_day: Generated<number>;
  rate_per_minute: Generated<number>;
  created_at: GeneratedTimestamp;
}

export interface OrganisationMembersTable {
  org_id: number;
  user_id: number;
  role: 'owner' | 'admin' | 'member';
}

export interface ApiTokensTable {
  id: string;
  org_id: number;
  name: Generated<string>;
  token_hash: string;
  scopes: string[];
  created_by: number | null;
  created_at: GeneratedTimestamp;
  last_used_at: Timestamp | null;
  revoked_at: Timestamp | null;
}

export interface ContactsTable {
  id: Generated<number>;
  org_id: number;
  name: Generated<string>;
  email: string | null;
  phone: string | null;
  preferred_chain: string[] | null;
  fields: ColumnType<Record<string, string>, string | undefined, string>;
  conv_id: number | null;
  created_at: GeneratedTimestamp;
}

export interface ContactGroupsTable {
  id: Generated<number>;
  org_id: number;
  name: string;
}

export interface ContactGroupMembersTable {
  group_id: number;
  contact_id: number;
}

export interface BlastsTable {
  id: Generated<number>;
  org_id: number;
  group_id: number | null;
  subject: Generated<string>;
  template: string;
  chain: string[] | null;
  total: Generated<number>;
  created_by: Generated<string>;
  created_at: GeneratedTimestamp;
  /** 012: the application's idempotency key. */
  client_key: ColumnType<string | null, string | null | undefined, string | null>;
  /** 012: when every message of the blast was prepared. */
  prepared_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
}

export interface OutboundMessagesTable {
  id: Generated<number>;
  org_id: number;
  contact_id: number;
  blast_id: number | null;
  conv_id: number | null;
  action_id: number | null;
  subject: Generated<string>;
  body: string;
  chain: string[];
  client_key: string | null;
  created_at: GeneratedTimestamp;
  /** 012: when its conversation action and delivery were created; null for a blast message not prepared yet. */
  prepared_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  /** 012: why it could not be prepared (it then has no delivery). */
  error: ColumnType<string | null, string | null | undefined, string | null>;
  /** 012: who wrote it (the organisation's address, or a member replying). */
  author: Generated<string>;
}

export interface DeliveryEventsTable {
  id: Generated<number>;
  delivery_id: number | null;
  org_id: ColumnType<number | null, number | null | undefined, number | null>;
  at: GeneratedTimestamp;
  plugin: string;
  kind: 'delivered' | 'read' | 'replied' | 'failed' | 'fallback' | 'retried' | 'cancelled';
  provider_ref: string | null;
  detail: Json | null;
}

export interface DeliveryAttemptsTable {
  id: Generated<number>;
  delivery_id: number;
  at: GeneratedTimestamp;
  plugin: string;
  outcome: 'accepted' | 'retry' | 'failed';
  error: string | null;
  provider_ref: string | null;
  duration_ms: number;
  worker: string;
}

export interface Database {
  users: UsersTable;
  user_streams: UserStreamsTable;
  sessions: SessionsTable;
  login_failures: LoginFailuresTable;
  conversations: ConversationsTable;
  actions: ActionsTable;
  messages: MessagesTable;
  participants: ParticipantsTable;
  labels: LabelsTable;
  conversation_labels: ConversationLabelsTable;
  user_events: UserEventsTable;
  blobs: BlobsTable;
  attachments: AttachmentsTable;
  email_messages: EmailMessagesTable;
  inbound_emails: InboundEmailsTable;
  deliveries: DeliveriesTable;
  delivery_attempts: DeliveryAttemptsTable;
  organisations: OrganisationsTable;
  organisation_members: OrganisationMembersTable;
  api_tokens: ApiTokensTable;
  contacts: ContactsTable;
  contact_groups: ContactGroupsTable;
  contact_group_members: ContactGroupMembersTable;
  blasts: BlastsTable;
  outbound_messages: OutboundMessagesTable;
  delivery_events: DeliveryEventsTable;
  platform_keys: PlatformKeysTable;
  federation_replay: FederationReplayTable;
}

/** 020: the platform's Ed25519 signing keys (docs/federation.md, "Platform identity"). */
export interface PlatformKeysTable {
  key_id: string;
  /** Raw 32-byte public key, base64url without padding. */
  public_key: string;
  /** PKCS#8 PEM; secret. */
  private_key: string;
  created_at: Timestamp;
  not_after: Timestamp;
  retired_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
}

/** 020: accepted federation request signatures, kept for replay protection until expires_at. */
export interface FederationReplayTable {
  id: string;
  expires_at: Timestamp;
}
