import { IBackoffOptions, ITimer, nextDelay, Poller } from '../poll';

const OPTS: IBackoffOptions = { interval: 1000, factor: 2, max: 8000 };

/** A timer the test advances by hand. */
class FakeTimer implements ITimer {
  pending: { fn: () => void; ms: number; id: number }[] = [];
  private next = 0;
  set(fn: () => void, ms: number): unknown {
    const id = ++this.next;
    this.pending.push({ fn, ms, id });
    return id;
  }
  clear(handle: unknown): void {
    this.pending = this.pending.filter(p => p.id !== handle);
  }
  get delays(): number[] {
    return this.pending.map(p => p.ms);
  }
  async fire(): Promise<void> {
    const p = this.pending.shift();
    expect(p).toBeDefined();
    p!.fn();
    await flush();
  }
}

async function flush(): Promise<void> {
  for (let i = 0; i < 10; i++) {
    await Promise.resolve();
  }
}

describe('nextDelay', () => {
  it('waits the interval while polls succeed', () => {
    expect(nextDelay(0, OPTS)).toBe(1000);
  });
  it('doubles after each failure up to the maximum', () => {
    expect([1, 2, 3, 4, 5].map(n => nextDelay(n, OPTS))).toEqual([2000, 4000, 8000, 8000, 8000]);
  });
});

describe('Poller', () => {
  it('backs off on errors and resets after a success', async () => {
    const timer = new FakeTimer();
    const outcomes = [false, false, false, true, false];
    const seen: string[] = [];
    const errors: [number, number][] = [];
    const poller = new Poller<string>(
      async () => {
        const ok = outcomes.shift();
        if (!ok) {
          throw new Error('down');
        }
        return 'status';
      },
      {
        onData: d => seen.push(d),
        onError: (_e, failures, delay) => errors.push([failures, delay])
      },
      OPTS,
      timer
    );
    poller.start();
    await flush();
    expect(timer.delays).toEqual([2000]);
    await timer.fire();
    await timer.fire();
    expect(errors).toEqual([
      [1, 2000],
      [2, 4000],
      [3, 8000]
    ]);
    expect(timer.delays).toEqual([8000]);
    await timer.fire(); // success
    expect(seen).toEqual(['status']);
    expect(poller.failures).toBe(0);
    expect(timer.delays).toEqual([1000]);
    await timer.fire(); // fails again: back to the first step
    expect(errors[errors.length - 1]).toEqual([1, 2000]);
  });

  it('refresh polls at once, cancels the pending wait and never overlaps', async () => {
    const timer = new FakeTimer();
    let calls = 0;
    let release: () => void = () => undefined;
    const poller = new Poller<number>(
      () =>
        new Promise<number>(resolve => {
          calls += 1;
          release = () => resolve(calls);
        }),
      { onData: () => undefined, onError: () => undefined },
      OPTS,
      timer
    );
    poller.start();
    await flush();
    expect(calls).toBe(1);
    const again = poller.refresh(); // while the first is in flight: queued, not parallel
    await flush();
    expect(calls).toBe(1);
    release();
    await flush();
    expect(calls).toBe(2);
    release();
    await again;
    expect(timer.pending.length).toBe(1); // exactly one next poll scheduled
  });

  it('stop cancels the next poll', async () => {
    const timer = new FakeTimer();
    const poller = new Poller<number>(async () => 1, { onData: () => undefined, onError: () => undefined }, OPTS, timer);
    poller.start();
    await flush();
    expect(timer.pending.length).toBe(1);
    poller.stop();
    expect(timer.pending.length).toBe(0);
    expect(poller.running).toBe(false);
  });
});
