// Forms generated from the JSON Schemas the server serves at /api/v1/schemas/{kind}, so a field
// added to schemas/*.json shows up here without UI code. Validation stays on the server: the
// form submits, and every problem of a 422 answer is shown next to the field its JSON pointer
// names.
//
// Supported schema shapes: string (enum → select or radio, const → fixed value, writeOnly →
// password), integer/number, boolean, arrays of primitives (comma separated), objects of
// primitive values (key/value rows), nested objects and local $refs (fieldsets).
//
// UI-only annotations (keywords starting with x-ui; validators ignore them):
//   x-ui-order            root: property names in display order (others follow in schema order)
//   x-ui-group            property: name of the fieldset it belongs to
//   x-ui-label            property: label (default: the humanized property name)
//   x-ui-help             property: help text (default: description)
//   x-ui-placeholder      property: placeholder; for an optional object, the "not set" choice
//   x-ui-widget           "textarea" for long text, "radio" for an enum shown as choices
//   x-ui-enumLabels       {value: label}, x-ui-enumDescriptions {value: text} for radio choices
//   x-ui-visibleWhen      {sibling: value | [values] | {present: bool}}, or an array of such
//                         objects (any may match); a hidden field is not submitted
//   x-ui-requiredWhen     same form; marks the field as required when it holds
//   x-ui-optionsFrom      an API collection (sentinels, listeners, downstreams): a string field
//                         becomes a select of its keys, an array field a list of checkboxes
//   x-ui-immutable        read-only when editing (definition keys)
//   x-ui-patternMessage   shown instead of the validator's regex message

import { api } from './api.js';
import { h, humanize, replace, uid } from './dom.js';

/** Builds a form for `schema`, with the option lists it needs fetched from the API. */
export async function createSchemaForm(schema, { initial, editing = false } = {}) {
  const options = await loadOptions(schema);
  const form = new SchemaForm(schema, { options, editing });
  form.set(initial ?? {});
  return form;
}

/** Fetches every collection named by an x-ui-optionsFrom in the schema: {name: [{value, label}]}. */
async function loadOptions(schema) {
  const names = new Set();
  const walk = (node) => {
    if (Array.isArray(node)) node.forEach(walk);
    else if (node && typeof node === 'object') {
      if (typeof node['x-ui-optionsFrom'] === 'string') names.add(node['x-ui-optionsFrom']);
      Object.values(node).forEach(walk);
    }
  };
  walk(schema);
  const entries = await Promise.all([...names].map(async (name) => {
    const items = await api.get(`/${encodeURIComponent(name)}`);
    return [name, items.map((item) => ({ value: item.key, label: item.name ?? item.key }))];
  }));
  return Object.fromEntries(entries);
}

export class SchemaForm {
  constructor(schema, { options = {}, editing = false } = {}) {
    this.ctx = { root: schema, options, editing, prefix: uid('form') };
    this.rootNode = new ObjectNode('', schema, this.ctx, { pointer: '', required: true, isRoot: true });
    this.element = h('div', { class: 'schema-form' }, this.rootNode.element);
    const refresh = () => this.rootNode.refresh();
    this.element.addEventListener('input', refresh);
    this.element.addEventListener('change', refresh);
    this.element.addEventListener('schema-form:refresh', refresh);
  }

  set(value) {
    this.rootNode.set(value);
    this.rootNode.refresh();
    this.rootNode.initialState();
  }

  /** The document to submit: only visible fields with a value. */
  value() {
    return this.rootNode.get() ?? {};
  }

  clearErrors() {
    this.rootNode.clearErrors();
  }

  /**
   * Shows an ApiError: each 422 detail beside the field its pointer names (the nearest visible
   * field up the pointer), the rest in the summary at the top.
   */
  showErrors(error) {
    this.clearErrors();
    const details = error.details ?? [];
    if (details.length === 0) {
      this.rootNode.addError(error.message);
    } else {
      let unplaced = 0;
      for (const detail of details) {
        const segments = detail.pointer ? detail.pointer.split('/').slice(1).map(decodePointerToken) : [];
        const node = this.rootNode.find(segments);
        if (node === this.rootNode) unplaced += 1;
        node.addError(detail.message);
      }
      const n = details.length;
      this.rootNode.setSummaryTitle(unplaced === n
        ? `The server found ${n} problem${n === 1 ? '' : 's'}:`
        : `The server found ${n} problems; these apply to the whole form:`);
    }
    const firstInvalid = this.element.querySelector('[aria-invalid="true"]:not([hidden])');
    (firstInvalid ?? this.rootNode.summary).focus();
  }

  focusFirst() {
    this.element.querySelector('input:not([type=hidden]):not([readonly]):not([disabled]), select, textarea')?.focus();
  }
}

function decodePointerToken(token) {
  return token.replace(/~1/g, '/').replace(/~0/g, '~');
}

/** Resolves a local "$ref" (#/$defs/...) and merges the referring schema's own keywords. */
function resolve(schema, root) {
  if (!schema || typeof schema.$ref !== 'string' || !schema.$ref.startsWith('#/')) return schema ?? {};
  const target = schema.$ref.slice(2).split('/').map(decodePointerToken)
    .reduce((node, token) => node?.[token], root) ?? {};
  const { $ref, ...own } = schema;
  return { ...resolve(target, root), ...own };
}

function primaryType(schema) {
  const types = Array.isArray(schema.type) ? schema.type : [schema.type];
  return types.find((t) => t && t !== 'null');
}

function typesOf(schema) {
  return Array.isArray(schema?.type) ? schema.type : schema?.type ? [schema.type] : ['string'];
}

/** Does a condition (x-ui-visibleWhen / x-ui-requiredWhen) hold for the sibling values? */
function holds(condition, lookup) {
  if (Array.isArray(condition)) return condition.some((c) => holds(c, lookup));
  return Object.entries(condition).every(([name, expected]) => {
    const actual = lookup(name);
    if (Array.isArray(expected)) return expected.includes(actual);
    if (expected && typeof expected === 'object') {
      if ('present' in expected) return (actual !== undefined && actual !== '') === expected.present;
      return false;
    }
    return actual === expected;
  });
}

/** Conditional requirements a schema states with allOf: [{if: {properties: {x: {const}}}, then: {required}}]. */
function conditionalRequirements(schema) {
  const rules = [];
  for (const part of schema.allOf ?? []) {
    const props = part?.if?.properties;
    const required = part?.then?.required;
    if (!props || !Array.isArray(required)) continue;
    const condition = {};
    for (const [name, test] of Object.entries(props)) {
      if ('const' in test) condition[name] = test.const;
      else if (Array.isArray(test.enum)) condition[name] = test.enum;
    }
    for (const field of required) rules.push([field, condition]);
  }
  return rules;
}

// ---------------------------------------------------------------------------------------------
// Nodes: one per schema property; objects hold child nodes.

class Node {
  constructor(name, schema, ctx, { pointer, required, optionalParent = false }) {
    this.name = name;
    this.schema = schema;
    this.ctx = ctx;
    this.pointer = pointer;
    this.staticRequired = required;
    this.optionalParent = optionalParent;
    this.visible = true;
    this.id = `${ctx.prefix}${pointer.replace(/[^A-Za-z0-9_-]/g, '-')}`;
    this.label = schema['x-ui-label'] ?? humanize(name);
    this.helpText = schema['x-ui-help'] ?? schema.description ?? '';
    this.errorEl = h('p', { class: 'field-error', id: `${this.id}-error`, hidden: true });
    this.marker = h('span', { class: 'req', title: 'required' }, ' *');
  }

  /** Help paragraph, or null. */
  help() {
    return this.helpText ? h('p', { class: 'help', id: `${this.id}-help` }, this.helpText) : null;
  }

  describedBy() {
    return [this.helpText && `${this.id}-help`, `${this.id}-error`].filter(Boolean).join(' ');
  }

  labelEl() {
    return h('label', { for: this.id, class: 'field-label' }, this.label, this.marker);
  }

  setVisible(visible) {
    this.visible = visible;
    this.element.hidden = !visible;
  }

  setRequired(required) {
    this.marker.hidden = !required;
    this.control?.setAttribute('aria-required', String(required));
  }

  find() {
    return this;
  }

  addError(message) {
    const text = this.schema['x-ui-patternMessage'] && /does not match/.test(message)
      ? this.schema['x-ui-patternMessage']
      : capitalize(message);
    const line = h('span', { class: 'error-line' }, text);
    this.errorEl.append(line);
    this.errorEl.hidden = false;
    this.element.classList.add('has-error');
    this.control?.setAttribute('aria-invalid', 'true');
  }

  clearErrors() {
    this.errorEl.replaceChildren();
    this.errorEl.hidden = true;
    this.element.classList.remove('has-error');
    this.control?.removeAttribute('aria-invalid');
  }

  /** The current value for conditions (undefined when empty). */
  raw() {
    return this.get();
  }

  refresh() {}

  initialState() {}
}

function capitalize(text) {
  return text ? text.charAt(0).toUpperCase() + text.slice(1) : text;
}

function createNode(name, schema, ctx, opts) {
  const s = resolve(schema, ctx.root);
  if ('const' in s) return new ConstNode(name, s, ctx, opts);
  if (Array.isArray(s.enum)) return s['x-ui-widget'] === 'radio' ? new RadioNode(name, s, ctx, opts) : new SelectNode(name, s, ctx, opts);
  const type = primaryType(s);
  if (type === 'object') {
    return s.properties ? new ObjectNode(name, s, ctx, opts) : new MapNode(name, s, ctx, opts);
  }
  if (type === 'array') {
    return s['x-ui-optionsFrom'] ? new MultiCheckNode(name, s, ctx, opts) : new ListNode(name, s, ctx, opts);
  }
  if (type === 'boolean') return new BooleanNode(name, s, ctx, opts);
  if (type === 'integer' || type === 'number') return new NumberNode(name, s, ctx, opts);
  if (s['x-ui-optionsFrom']) return new OptionsSelectNode(name, s, ctx, opts);
  return new TextNode(name, s, ctx, opts);
}

class ObjectNode extends Node {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.isRoot = Boolean(opts.isRoot);
    const required = new Set(schema.required ?? []);
    const childOptional = !this.isRoot && (!opts.required || opts.optionalParent);
    this.requiredRules = conditionalRequirements(schema);
    this.children = new Map();
    const order = schema['x-ui-order'] ?? [];
    const names = Object.keys(schema.properties ?? {});
    names.sort((a, b) => rank(order, a) - rank(order, b));
    for (const child of names) {
      this.children.set(child, createNode(child, schema.properties[child], ctx, {
        pointer: `${opts.pointer}/${child.replace(/~/g, '~0').replace(/\//g, '~1')}`,
        required: required.has(child),
        optionalParent: childOptional,
        placeholderOfParent: schema['x-ui-placeholder'],
      }));
    }
    this.element = this.isRoot ? this.renderRoot() : this.renderNested();
  }

  renderRoot() {
    this.summaryTitle = h('strong', {});
    this.summary = h('div', { class: 'callout callout-error form-summary', role: 'alert', tabindex: '-1', hidden: true },
      this.summaryTitle, this.errorEl);
    this.groups = new Map();
    const body = h('div', { class: 'form-groups' }, this.summary);
    for (const node of this.children.values()) {
      const groupName = node.schema['x-ui-group'] ?? '';
      if (!this.groups.has(groupName)) {
        const fields = h('div', { class: 'group-fields' });
        const set = groupName
          ? h('fieldset', { class: 'group' }, h('legend', {}, groupName), fields)
          : h('div', { class: 'group' }, fields);
        this.groups.set(groupName, { element: set, fields, nodes: [] });
        body.append(set);
      }
      const group = this.groups.get(groupName);
      group.fields.append(node.element);
      group.nodes.push(node);
    }
    return body;
  }

  renderNested() {
    return h('fieldset', { class: 'field subfieldset', dataset: { pointer: this.pointer } },
      h('legend', { class: 'field-label' }, this.label, this.marker),
      this.help(),
      h('div', { class: 'subfields' }, [...this.children.values()].map((n) => n.element)),
      this.errorEl);
  }

  lookup(name) {
    const node = this.children.get(name);
    return node && node.visible ? node.raw() : undefined;
  }

  refresh() {
    const lookup = (name) => this.lookup(name);
    // Two passes: a field's visibility may depend on a sibling whose own visibility changed.
    for (let pass = 0; pass < 2; pass += 1) {
      for (const node of this.children.values()) {
        const when = node.schema['x-ui-visibleWhen'];
        node.setVisible(!when || holds(when, lookup));
      }
    }
    for (const [name, node] of this.children) {
      const requiredWhen = node.schema['x-ui-requiredWhen'];
      const required = (node.staticRequired && !(node.optionalParent && !this.hasValue()))
        || (requiredWhen ? holds(requiredWhen, lookup) : false)
        || this.requiredRules.some(([field, condition]) => field === name && holds(condition, lookup));
      node.setRequired(required && !(node instanceof BooleanNode) && !(node instanceof ConstNode));
      node.refresh();
    }
    if (this.groups) {
      for (const group of this.groups.values()) group.element.hidden = group.nodes.every((n) => !n.visible);
    }
  }

  initialState() {
    for (const node of this.children.values()) node.initialState();
  }

  hasValue() {
    return [...this.children.values()].some((n) => n.visible && n.get() !== undefined);
  }

  get() {
    const out = {};
    for (const [name, node] of this.children) {
      if (!node.visible) continue;
      const value = node.get();
      if (value !== undefined) out[name] = value;
    }
    if (!this.isRoot && !this.staticRequired && Object.keys(out).length === 0) return undefined;
    return out;
  }

  raw() {
    return this.hasValue() ? this.get() : undefined;
  }

  set(value) {
    for (const [name, node] of this.children) node.set(value?.[name]);
  }

  find(segments) {
    if (segments.length === 0) return this;
    const child = this.children.get(segments[0]);
    return child && child.visible ? child.find(segments.slice(1)) : this;
  }

  setRequired(required) {
    this.marker.hidden = !required;
  }

  setSummaryTitle(text) {
    if (this.summaryTitle) this.summaryTitle.textContent = text;
  }

  addError(message) {
    if (!this.isRoot) {
      super.addError(message);
      return;
    }
    this.errorEl.append(h('span', { class: 'error-line' }, capitalize(message)));
    this.errorEl.hidden = false;
    this.summary.hidden = false;
  }

  clearErrors() {
    super.clearErrors();
    if (this.summary) {
      this.summary.hidden = true;
      this.summaryTitle.textContent = '';
    }
    for (const node of this.children.values()) node.clearErrors();
  }
}

function rank(order, name) {
  const i = order.indexOf(name);
  return i === -1 ? order.length : i;
}

/** A plain labelled control: label, control, help, error. */
class InputNode extends Node {
  layout(control, { after } = {}) {
    this.control = control;
    control.id = this.id;
    control.setAttribute('aria-describedby', this.describedBy());
    return h('div', { class: 'field', dataset: { pointer: this.pointer } },
      this.labelEl(), after ? h('div', { class: 'input-row' }, control, after) : control, this.help(), this.errorEl);
  }
}

class TextNode extends InputNode {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.secret = schema.writeOnly === true;
    this.placeholder = schema['x-ui-placeholder'] ?? (schema.default !== undefined ? `${schema.default} (default)` : '');
    const placeholder = this.placeholder;
    const attrs = { class: 'input', name, placeholder, spellcheck: 'false', autocomplete: this.secret ? 'new-password' : 'off' };
    if (schema['x-ui-widget'] === 'textarea') {
      this.input = h('textarea', { ...attrs, rows: 3, spellcheck: 'true' });
    } else {
      this.input = h('input', { ...attrs, type: this.secret ? 'password' : 'text' });
    }
    this.immutable = schema['x-ui-immutable'] === true && ctx.editing;
    if (this.immutable) {
      this.input.readOnly = true;
      this.helpText = 'Keys cannot be changed once created.';
    }
    this.element = this.layout(this.input);
  }

  get() {
    const value = this.input.value;
    return value === '' ? undefined : value;
  }

  /** Called once the stored document is shown: a write-only field that applied may be kept. */
  initialState() {
    if (this.secret && this.ctx.editing && this.visible) this.input.placeholder = `Leave empty to keep the stored ${this.label.toLowerCase()}`;
  }

  set(value) {
    // A write-only value (a password) is never shown, even if a server sent one.
    this.input.value = this.secret || value === undefined || value === null ? '' : String(value);
  }
}

class NumberNode extends InputNode {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.integer = primaryType(schema) === 'integer';
    this.input = h('input', {
      class: 'input input-number', name, type: 'text', inputmode: this.integer ? 'numeric' : 'decimal',
      placeholder: schema['x-ui-placeholder'] ?? (schema.default !== undefined ? `${schema.default} (default)` : ''),
      autocomplete: 'off',
    });
    this.element = this.layout(this.input);
  }

  get() {
    const text = this.input.value.trim();
    if (text === '') return undefined;
    const number = Number(text);
    // Anything else is sent as typed, so the server names the problem next to the field.
    return Number.isFinite(number) ? number : text;
  }

  set(value) {
    this.input.value = value === undefined || value === null ? '' : String(value);
  }
}

class BooleanNode extends Node {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.input = h('input', { type: 'checkbox', class: 'switch', id: this.id, name, 'aria-describedby': this.describedBy() });
    this.control = this.input;
    this.element = h('div', { class: 'field field-check', dataset: { pointer: this.pointer } },
      h('label', { class: 'check', for: this.id }, this.input, h('span', {}, this.label)),
      this.help(), this.errorEl);
  }

  get() {
    return this.input.checked;
  }

  set(value) {
    this.input.checked = typeof value === 'boolean' ? value : this.schema.default === true;
  }
}

class ConstNode extends Node {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    const labels = schema['x-ui-enumLabels'] ?? {};
    this.control = h('output', { class: 'fixed', id: this.id }, labels[schema.const] ?? String(schema.const));
    this.element = h('div', { class: 'field', dataset: { pointer: this.pointer } },
      h('span', { class: 'field-label' }, this.label), this.control, this.help(), this.errorEl);
  }

  get() {
    return this.schema.const;
  }

  set() {}
}

/** Shared by enum widgets: the choices, with a "not set" choice when the field may be absent. */
function enumChoices(node) {
  const labels = node.schema['x-ui-enumLabels'] ?? {};
  const choices = node.schema.enum.map((value) => ({ value, label: labels[value] ?? String(value) }));
  const absentAllowed = !node.staticRequired || node.optionalParent;
  if (absentAllowed && node.schema.default === undefined) {
    const text = node.optionalParent ? (node.placeholderOfParent ?? 'Not set') : 'Not set';
    choices.unshift({ value: undefined, label: text });
  }
  return choices;
}

class SelectNode extends InputNode {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.placeholderOfParent = opts.placeholderOfParent;
    this.choices = enumChoices(this);
    this.select = h('select', { class: 'input', name },
      this.choices.map((c, i) => h('option', { value: String(i) }, c.label)));
    this.element = this.layout(this.select);
  }

  get() {
    return this.choices[Number(this.select.value)]?.value;
  }

  set(value) {
    let index = this.choices.findIndex((c) => c.value === (value ?? this.schema.default));
    if (index === -1) index = 0;
    this.select.value = String(index);
  }
}

class RadioNode extends Node {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.placeholderOfParent = opts.placeholderOfParent;
    this.choices = enumChoices(this);
    const descriptions = schema['x-ui-enumDescriptions'] ?? {};
    // Choices that describe themselves make the schema description redundant.
    if (schema['x-ui-enumDescriptions'] && !schema['x-ui-help']) this.helpText = '';
    const groupName = `${this.id}-choice`;
    this.inputs = this.choices.map((choice, i) => h('input', {
      type: 'radio', name: groupName, value: String(i), id: `${this.id}-${i}`,
    }));
    this.control = this.inputs[0];
    this.element = h('fieldset', { class: 'field field-radio', dataset: { pointer: this.pointer }, 'aria-describedby': this.describedBy() },
      h('legend', { class: 'field-label' }, this.label, this.marker),
      h('div', { class: 'choices' }, this.choices.map((choice, i) => h('label', { class: 'choice', for: `${this.id}-${i}` },
        this.inputs[i],
        h('span', { class: 'choice-text' },
          h('span', { class: 'choice-title' }, choice.label),
          descriptions[choice.value] ? h('span', { class: 'choice-desc' }, descriptions[choice.value]) : null)))),
      this.help(), this.errorEl);
  }

  get() {
    const checked = this.inputs.find((input) => input.checked);
    return checked ? this.choices[Number(checked.value)].value : undefined;
  }

  set(value) {
    let index = this.choices.findIndex((c) => c.value === (value ?? this.schema.default));
    if (index === -1) index = 0;
    this.inputs.forEach((input, i) => { input.checked = i === index; });
  }

  addError(message) {
    super.addError(message);
    this.inputs.forEach((input) => input.setAttribute('aria-invalid', 'true'));
  }

  clearErrors() {
    super.clearErrors();
    this.inputs.forEach((input) => input.removeAttribute('aria-invalid'));
  }
}

/** Link to where the missing options can be created, e.g. #/sentinels/new. */
function createLink(collection) {
  return h('a', { href: `#/${collection}/new` }, `Create one`);
}

class OptionsSelectNode extends InputNode {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.collection = schema['x-ui-optionsFrom'];
    this.options = ctx.options[this.collection] ?? [];
    this.select = h('select', { class: 'input', name });
    const note = this.options.length === 0
      ? h('p', { class: 'help' }, `No ${this.collection} exist yet. `, createLink(this.collection), '.')
      : null;
    this.element = this.layout(this.select);
    if (note) this.element.insertBefore(note, this.errorEl);
    this.fill(undefined);
  }

  fill(selected) {
    const options = [...this.options];
    if (selected && !options.some((o) => o.value === selected)) options.push({ value: selected, label: `${selected} (not found)` });
    replace(this.select,
      h('option', { value: '' }, '— none —'),
      options.map((o) => h('option', { value: o.value }, o.label === o.value ? o.value : `${o.label} (${o.value})`)));
    this.select.value = selected ?? '';
  }

  get() {
    return this.select.value === '' ? undefined : this.select.value;
  }

  set(value) {
    this.fill(value ?? undefined);
  }
}

class MultiCheckNode extends Node {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.collection = schema['x-ui-optionsFrom'];
    this.options = ctx.options[this.collection] ?? [];
    this.list = h('div', { class: 'checklist' });
    this.element = h('fieldset', { class: 'field field-multi', dataset: { pointer: this.pointer }, 'aria-describedby': this.describedBy() },
      h('legend', { class: 'field-label' }, this.label, this.marker),
      this.list, this.help(), this.errorEl);
    this.fill([]);
  }

  fill(selected) {
    const options = [...this.options];
    for (const value of selected) {
      if (!options.some((o) => o.value === value)) options.push({ value, label: `${value} (not found)` });
    }
    if (options.length === 0) {
      this.inputs = [];
      this.control = null;
      this.list.replaceChildren(h('p', { class: 'muted' }, `No ${this.collection} exist yet. `, createLink(this.collection), '.'));
      return;
    }
    this.inputs = options.map((o, i) => h('input', { type: 'checkbox', value: o.value, id: `${this.id}-${i}`, checked: selected.includes(o.value) }));
    this.control = this.inputs[0];
    this.list.replaceChildren(...options.map((o, i) => h('label', { class: 'check', for: `${this.id}-${i}` },
      this.inputs[i], h('span', {}, o.label === o.value ? o.value : `${o.label}`, h('span', { class: 'muted mono' }, ` ${o.value}`)))));
  }

  get() {
    const values = this.inputs.filter((i) => i.checked).map((i) => i.value);
    return values.length ? values : undefined;
  }

  set(value) {
    this.fill(Array.isArray(value) ? value : []);
  }

  setRequired(required) {
    this.marker.hidden = !required;
  }
}

/** Parses one typed-in value for a schema that allows several primitive types. */
function parseLoose(text, types) {
  const t = text.trim();
  if (types.includes('string') && t.length >= 2 && t.startsWith('"') && t.endsWith('"')) return t.slice(1, -1);
  if (types.includes('number') || types.includes('integer')) {
    if (t !== '' && Number.isFinite(Number(t))) return Number(t);
  }
  if (types.includes('boolean') && (t === 'true' || t === 'false')) return t === 'true';
  if (types.includes('null') && t === 'null') return null;
  return t;
}

function formatLoose(value, types) {
  if (typeof value === 'string') return parseLoose(value, types) === value ? value : JSON.stringify(value);
  return String(value);
}

/** An array of primitives typed as a comma (or line) separated list. */
class ListNode extends InputNode {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.itemTypes = typesOf(resolve(schema.items, ctx.root));
    this.input = h('input', {
      class: 'input', name, type: 'text', autocomplete: 'off', spellcheck: 'false',
      placeholder: schema['x-ui-placeholder'] ?? 'value, value',
    });
    if (!this.helpText) this.helpText = 'Separate values with commas.';
    this.element = this.layout(this.input);
  }

  get() {
    const items = this.input.value.split(/[,\n]/).map((s) => s.trim()).filter((s) => s !== '');
    return items.length ? items.map((s) => parseLoose(s, this.itemTypes)) : undefined;
  }

  set(value) {
    // A field that takes one value or a list (origin) may hold a single value.
    const list = Array.isArray(value) ? value : (value === undefined || value === null ? [] : [value]);
    this.input.value = list.map((v) => formatLoose(v, this.itemTypes)).join(', ');
  }
}

/** An object with free keys (headers, properties): editable key/value rows. */
class MapNode extends Node {
  constructor(name, schema, ctx, opts) {
    super(name, schema, ctx, opts);
    this.valueTypes = typesOf(resolve(schema.additionalProperties, ctx.root));
    this.rows = h('div', { class: 'kv-rows' });
    const add = h('button', { type: 'button', class: 'btn btn-secondary btn-small', onclick: () => this.addRow('', '', true) }, '+ Add entry');
    this.element = h('fieldset', { class: 'field field-map', dataset: { pointer: this.pointer }, 'aria-describedby': this.describedBy() },
      h('legend', { class: 'field-label' }, this.label, this.marker),
      this.rows, h('div', { class: 'kv-actions' }, add), this.help(), this.errorEl);
  }

  addRow(key, value, focus = false) {
    const keyInput = h('input', { class: 'input mono', type: 'text', value: key, 'aria-label': `${this.label}: name`, placeholder: 'name', autocomplete: 'off', spellcheck: 'false' });
    const valueInput = h('input', { class: 'input', type: 'text', value, 'aria-label': `${this.label}: value`, placeholder: 'value', autocomplete: 'off', spellcheck: 'false' });
    const row = h('div', { class: 'kv-row' }, keyInput, valueInput,
      h('button', {
        type: 'button', class: 'icon-btn', 'aria-label': `Remove ${this.label.toLowerCase()} entry`, title: 'Remove',
        onclick: () => { row.remove(); this.element.dispatchEvent(new Event('change', { bubbles: true })); },
      }, '×'));
    this.rows.append(row);
    this.control = this.rows.querySelector('input');
    if (focus) keyInput.focus();
  }

  get() {
    const out = {};
    for (const row of this.rows.children) {
      const [keyInput, valueInput] = row.querySelectorAll('input');
      const key = keyInput.value.trim();
      if (key) out[key] = parseLoose(valueInput.value, this.valueTypes);
    }
    return Object.keys(out).length ? out : undefined;
  }

  set(value) {
    this.rows.replaceChildren();
    for (const [k, v] of Object.entries(value ?? {})) this.addRow(k, formatLoose(v, this.valueTypes));
  }

  addError(message) {
    super.addError(message);
    this.rows.querySelectorAll('input').forEach((i) => i.setAttribute('aria-invalid', 'true'));
  }

  clearErrors() {
    super.clearErrors();
    this.rows.querySelectorAll('input').forEach((i) => i.removeAttribute('aria-invalid'));
  }

  setRequired(required) {
    this.marker.hidden = !required;
  }
}
