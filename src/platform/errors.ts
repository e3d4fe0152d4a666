/**
 * One error type for the whole platform. Every surface maps it the same way:
 * HTTP answers `status` with `{"error": {"code", "message", "details"}}`, SMTP answers
 * a 4xx/5xx reply with the message, the CLI prints the message and exits non-zero.
 * Database and internal details never leak through it (ARCHITECTURE.md, "Rules").
 */
export class AppError extends Error {
  /**
   * @param status HTTP status code (4xx for the caller's mistakes, 5xx for ours)
   * @param code stable machine-readable code, snake_case, e.g. `follows_not_head`
   * @param message a sentence for humans
   * @param details optional structured context (ids, limits) safe to show the caller
   */
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
    this.name = 'AppError';
  }

  /** The JSON body of an HTTP error response. */
  toJSON(): { error: { code: string; message: string; details?: Record<string, unknown> } } {
    return { error: { code: this.code, message: this.message, ...(this.details ? { details: this.details } : {}) } };
  }
}

/** 400: the request is malformed or violates a documented limit. */
export const badRequest = (code: string, message: string, details?: Record<string, unknown>) =>
  new AppError(400, code, message, details);
/** 401: no valid credentials. */
export const unauthorized = (message = 'authentication required', code = 'unauthorized') =>
  new AppError(401, code, message);
/** 403: authenticated but not allowed. */
export const forbidden = (code: string, message: string, details?: Record<string, unknown>) =>
  new AppError(403, code, message, details);
/** 404: not found, or not visible to the caller (the two are indistinguishable on purpose). */
export const notFound = (what: string, details?: Record<string, unknown>) =>
  new AppError(404, 'not_found', `${what} not found`, details);
/** 409: conflicts with the current state (non-head `follows`, a held lock, a duplicate). */
export const conflict = (code: string, message: string, details?: Record<string, unknown>) =>
  new AppError(409, code, message, details);
/** 413: a body or file is larger than the documented limit. */
export const tooLarge = (message: string, details?: Record<string, unknown>) =>
  new AppError(413, 'too_large', message, details);
/** 429: throttled; `retryAfterS` tells when to try again. */
export const tooManyRequests = (message: string, retryAfterS: number) =>
  new AppError(429, 'rate_limited', message, { retry_after_s: retryAfterS });
