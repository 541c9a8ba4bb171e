/**
 * Polling with exponential backoff on errors.
 *
 * Pure logic (no JupyterLab imports): the timer is injectable so the tests drive time.
 */

export interface IBackoffOptions {
  /** Milliseconds between polls while they succeed. */
  interval: number;
  /** Growth factor of the wait after each consecutive failure. */
  factor: number;
  /** Upper bound of the wait, milliseconds. */
  max: number;
}

export const DEFAULT_BACKOFF: IBackoffOptions = {
  interval: 2000,
  factor: 2,
  max: 60000
};

/**
 * Milliseconds to wait before the next poll after `failures` consecutive failures
 * (0: the regular interval; n: interval * factor^n, at most `max`).
 */
export function nextDelay(
  failures: number,
  options: IBackoffOptions = DEFAULT_BACKOFF
): number {
  if (failures <= 0) {
    return options.interval;
  }
  const delay = options.interval * Math.pow(options.factor, failures);
  return Math.min(options.max, delay);
}

export interface ITimer {
  set(fn: () => void, ms: number): unknown;
  clear(handle: unknown): void;
}

export const browserTimer: ITimer = {
  set: (fn, ms) => setTimeout(fn, ms),
  clear: handle => clearTimeout(handle as ReturnType<typeof setTimeout>)
};

export interface IPollerCallbacks<T> {
  /** Each successful result. */
  onData(data: T): void;
  /** Each failure, with the count of consecutive failures and the wait before the next try. */
  onError(error: unknown, failures: number, delay: number): void;
}

/**
 * Calls `fetch` now and then again `interval` ms after each success, or after a growing
 * wait after each failure. Never runs two fetches at once.
 */
export class Poller<T> {
  constructor(
    private readonly fetch: () => Promise<T>,
    private readonly callbacks: IPollerCallbacks<T>,
    private readonly options: IBackoffOptions = DEFAULT_BACKOFF,
    private readonly timer: ITimer = browserTimer
  ) {}

  /** Consecutive failures so far (0 after a success). */
  get failures(): number {
    return this._failures;
  }

  get running(): boolean {
    return this._running;
  }

  start(): void {
    if (this._running) {
      return;
    }
    this._running = true;
    void this.tick();
  }

  stop(): void {
    this._running = false;
    this.cancel();
  }

  /** Poll now (e.g. after an action), resetting the backoff wait. */
  refresh(): Promise<void> {
    this.cancel();
    return this.tick();
  }

  private cancel(): void {
    if (this._handle !== null) {
      this.timer.clear(this._handle);
      this._handle = null;
    }
  }

  private async tick(): Promise<void> {
    if (this._inFlight) {
      this._again = true;
      return this._inFlight;
    }
    this._inFlight = this.once();
    try {
      await this._inFlight;
    } finally {
      this._inFlight = null;
    }
    if (this._again) {
      this._again = false;
      return this.tick();
    }
  }

  private async once(): Promise<void> {
    let delay: number;
    try {
      const data = await this.fetch();
      this._failures = 0;
      delay = nextDelay(0, this.options);
      this.callbacks.onData(data);
    } catch (error) {
      this._failures += 1;
      delay = nextDelay(this._failures, this.options);
      this.callbacks.onError(error, this._failures, delay);
    }
    if (this._running) {
      this.cancel();
      this._handle = this.timer.set(() => {
        this._handle = null;
        void this.tick();
      }, delay);
    }
  }

  private _failures = 0;
  private _running = false;
  private _handle: unknown = null;
  private _inFlight: Promise<void> | null = null;
  private _again = false;
}
