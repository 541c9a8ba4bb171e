import { lensCell, lensMenu, PREFERRED_LENS } from '../templates';

describe('lensCell', () => {
  it('opens a lens dashboard on the default engine', () => {
    expect(lensCell('smollm2-135m')).toBe(
      [
        'import tpmlab',
        'from tpmlab.widgets import dashboard',
        '',
        'lab = tpmlab.connect()',
        'model = lab.model("smollm2-135m")',
        'dashboard(model, "logit")'
      ].join('\n')
    );
  });
  it('connects to the sidebar\'s scheduler and quotes names safely', () => {
    const code = lensCell('my "model"', 'attention', 'tcp://10.0.0.5:8786');
    expect(code).toContain('lab = tpmlab.connect("tcp://10.0.0.5:8786")');
    expect(code).toContain('model = lab.model("my \\"model\\"")');
    expect(code).toContain('dashboard(model, "attention")');
  });
  it('does not pass in-process scheduler addresses to a kernel', () => {
    expect(lensCell('m', 'logit', 'inproc://10.0.0.5/1/1')).toContain('tpmlab.connect()');
  });
});

describe('lensMenu', () => {
  const LIST = [
    { name: 'attention', title: 'attention lens', description: 'Per head.', inputs: 'prompt' },
    { name: 'logit', title: 'logit lens', description: 'Every layer decoded.', inputs: 'prompt' },
    { name: 'my_lens', title: '', description: '', inputs: 'pair' }
  ];
  it('offers every lens the server lists, by title, in its order', () => {
    const { choices } = lensMenu(LIST);
    expect(choices).toEqual([
      { value: 'attention', label: 'attention lens', title: 'Per head.' },
      { value: 'logit', label: 'logit lens', title: 'Every layer decoded.' },
      { value: 'my_lens', label: 'my_lens', title: 'my_lens' }
    ]);
  });
  it('keeps the current choice while it is offered, else the preferred lens, else the first', () => {
    expect(lensMenu(LIST, 'my_lens').selected).toBe('my_lens');
    expect(lensMenu(LIST, 'gone').selected).toBe(PREFERRED_LENS);
    expect(lensMenu(LIST).selected).toBe('logit');
    expect(lensMenu([LIST[2]], null).selected).toBe('my_lens');
    expect(lensMenu([]).selected).toBeNull();
  });
  it('names no lens of its own', () => {
    expect(lensMenu([]).choices).toEqual([]);
  });
});
